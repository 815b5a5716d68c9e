"""Which task's decoupled weights a sample gets when no task label says so.

- `entropy_router`, the baseline: per sample, the task whose decoupled model is most certain,
  argmin_t H(softmax(z_t)). It needs every candidate's outputs, and a confidently wrong model wins.
- `GaussianRouter`, training-free, in theta0's features f(x) (the shared weights before any task): one
  Gaussian per (task, class) with a covariance shared by all, fitted on a small support set of each task's
  training data (Lee et al., NeurIPS 2018). A sample goes to the task of its nearest class mean in Mahalanobis
  distance, d_k(x) = (f - mu_k)^T P (f - mu_k), with P the inverse of the shrunk pooled covariance
  (1 - s) S + s (tr S / d) I; `metric="prototype"` takes P = I, the nearest class mean. Because f is computed
  with theta0, which no task moves, the statistics of old tasks stay valid as tasks are added; they are sums, so
  a task adds its own without touching the others'.
"""

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from avalanche.models import MultiHeadClassifier, avalanche_forward
from torch import Tensor, nn

from mmer_cl import checkpoints


def predictive_entropy(logits: Tensor) -> Tensor:
    """H(p) = -sum_c p_c log p_c of softmax(logits), per row."""
    logp = torch.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def entropy_router(outputs: list[Tensor]) -> Tensor:
    """Per sample, the candidate whose decoupled model is most certain: argmin_c H(softmax(logits_c))."""
    return torch.stack([predictive_entropy(logits) for logits in outputs]).argmin(dim=0)


def classifier_inputs(model: nn.Module, x: Tensor, task_label: int) -> Tensor:
    """The penultimate features: what enters the model's last classifier (its last MultiHeadClassifier, else
    its last nn.Linear), flattened to [B, d]."""
    heads = ([m for m in model.modules() if isinstance(m, MultiHeadClassifier)]
             or [m for m in model.modules() if isinstance(m, nn.Linear)])
    if not heads:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or MultiHeadClassifier to take features from; "
                         f"give GaussianRouter(features=lambda model, x, task_label: ...)")
    captured = []
    handle = heads[-1].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        avalanche_forward(model, x, torch.full((len(x),), task_label, dtype=torch.long, device=x.device))
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"the last classifier of {type(model).__name__} never ran on task label {task_label}; "
                         f"give GaussianRouter(features=lambda model, x, task_label: ...)")
    return captured[0].flatten(1)


class GaussianRouter:
    """Routes a sample to the task of its nearest class in theta0's features (see the module docstring).

    support: training samples per task that fit its class means; shrinkage: s, toward a scaled identity;
    metric: "mahalanobis" or "prototype"; features: (model, x, task_label) -> [B, d] (classifier_inputs).
    """

    def __init__(self, support: int = 500, shrinkage: float = 0.1, metric: str = "mahalanobis",
                 features: Callable[[nn.Module, Tensor, int], Tensor] = classifier_inputs):
        if metric not in ("mahalanobis", "prototype"):
            raise ValueError(f"metric must be 'mahalanobis' or 'prototype', not {metric!r}")
        if not 0.0 <= shrinkage <= 1.0 or support < 1:
            raise ValueError(f"need support >= 1 and 0 <= shrinkage <= 1, got support={support}, shrinkage={shrinkage}")
        self.support, self.shrinkage, self.metric, self.features = support, shrinkage, metric, features
        self.sums: dict[tuple[str, int], Tensor] = {}  # (task, class) -> sum of f, float64
        self.counts: dict[tuple[str, int], int] = {}
        self.scatter: Tensor | None = None  # sum of f f^T over every support sample

    def fit(self, task: str, features: Tensor, targets: Tensor) -> None:
        """Adds one task's support set: features [N, d] at theta0, targets [N]."""
        f = features.detach().double().cpu()
        targets = targets.cpu()
        for c in targets.unique().tolist():
            rows = f[targets == c]
            self.sums[(task, int(c))] = rows.sum(0)
            self.counts[(task, int(c))] = len(rows)
        scatter = f.T @ f
        self.scatter = scatter if self.scatter is None else self.scatter + scatter

    def precision(self) -> Tensor:
        """P = ((1 - s) S + s (tr S / d) I)^-1, S the covariance pooled within classes."""
        d = self.scatter.shape[0]
        if self.metric == "prototype":
            return torch.eye(d, dtype=torch.float64)
        n, k = sum(self.counts.values()), len(self.counts)
        between = sum(torch.outer(s, s) / self.counts[key] for key, s in self.sums.items())
        S = (self.scatter - between) / max(n - k, 1)
        shrunk = (1 - self.shrinkage) * S + self.shrinkage * (torch.trace(S) / d) * torch.eye(d, dtype=S.dtype)
        return torch.linalg.inv(shrunk)

    def distances(self, features: Tensor, tasks: Sequence[str]) -> tuple[Tensor, list[str]]:
        """d_k(x) for every class k of `tasks`: ([B, K], the task of each k)."""
        keys = [key for key in self.sums if key[0] in tasks]
        missing = set(tasks) - {task for task, _ in keys}
        if missing:
            raise ValueError(f"GaussianRouter has no support set for tasks {sorted(missing)}")
        means = torch.stack([self.sums[key] / self.counts[key] for key in keys])  # [K, d]
        P, f = self.precision(), features.detach().double().cpu()
        Pf, Pm = f @ P, means @ P
        d = (Pf * f).sum(1, keepdim=True) - 2 * Pf @ means.T + (Pm * means).sum(1)
        return d, [task for task, _ in keys]

    def route(self, features: Tensor, tasks: Sequence[str]) -> Tensor:
        """Per sample, the index in `tasks` of the task its nearest class belongs to."""
        d, owner = self.distances(features, tasks)
        position = torch.tensor([list(tasks).index(task) for task in owner])
        return position[d.argmin(dim=1)]

    def state_dict(self) -> dict[str, Tensor]:
        """What the router keeps: per (task, class) the feature sum and count, and the scatter matrix."""
        out = {"scatter": self.scatter}
        for (task, c), s in self.sums.items():
            out[f"{task}/{c}/sum"] = s
            out[f"{task}/{c}/count"] = torch.tensor(self.counts[(task, c)], dtype=torch.int64)
        return out

    def save(self, folder: Path) -> None:
        """The router's statistics as a safetensors folder, replacing an older copy only once written."""
        folder = Path(folder)
        partial, old = folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".old")
        for leftover in (partial, old):
            shutil.rmtree(leftover, ignore_errors=True)
        checkpoints.save(partial, self.state_dict())
        if folder.exists():
            folder.rename(old)
        partial.rename(folder)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, folder: Path, **options) -> "GaussianRouter":
        ckpt = checkpoints.Checkpoint(folder)
        router = cls(**options)
        router.scatter = ckpt.read("scatter")
        for name in ckpt.names:
            if name.endswith("/sum"):
                task, c, _ = name.rsplit("/", 2)
                router.sums[(task, int(c))] = ckpt.read(name)
                router.counts[(task, int(c))] = int(ckpt.read(f"{task}/{c}/count"))
        return router
