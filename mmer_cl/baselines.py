"""The methods MMER is compared against, built on the same experts and data (SPEC, "Baselines").

Merging baselines act on the experts' task vectors in memory, per parameter (merging.merge_state_dicts);
each gives task t's shared weights theta_t (all private parameters stay the task's own):
    task_arithmetic  theta_t = theta0 + alpha * sum_i tau_i
    ties             theta_t = theta0 + alpha * TIES_k(tau)                  (trim per tensor, elect, disjoint mean)
    dare_ties        theta_t = theta0 + alpha * TIES_k(DARE_p(tau))
    tall             theta_t = theta0 + m_t * tau_mtl,  tau_mtl = alpha * sum_i tau_i,  m_t = 1[|tau_t| >= lam |tau_mtl - tau_t|]
    emr              theta_t = theta0 + r_t * m_t * tau_uni,  m_t = 1[tau_t * tau_uni > 0],  r_t = sum|tau_t| / sum|m_t tau_uni|
    magmax           theta_t = theta0 + alpha * MagMax(tau of the sequential fine-tunes)
    mmer             theta_t = theta0 + m_t * tau_star,  tau_star = alpha * TIES_k(tau),  m_t = 1[|tau_t| >= lam |tau_t - tau_star|]
and the mask controls on MMER's tau_star: `mmer_random` (a random mask of MMER's effective density) and
`mmer_sign` (m_t = 1[tau_t * tau_star > 0]).

Training baselines: Avalanche's Naive, EWC, LwF and Replay on one multi-head model (TaskRouter), and joint
multi-task training (round-robin batches over all tasks). Their hyperparameters are fixed, not tuned (below).
"""

import itertools
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mmer_cl import merging, metrics
from mmer_cl.strategy import TaskRouter, TaskSpec

StateDict = Mapping[str, Tensor]

# Avalanche baselines' settings: common defaults from the Avalanche examples and papers, not tuned here.
EWC_LAMBDA = 100.0
LWF_ALPHA, LWF_TEMPERATURE = 1.0, 2.0
REPLAY_MEM_PER_TASK = 100
DARE_P = 0.5


class ExpertPool:
    """theta0 and every expert's task vector tau_t = theta_t - theta0 and private parameters, in memory."""

    def __init__(self, theta0: StateDict, experts: Mapping[str, StateDict]):
        self.theta0 = {name: t.detach().float() for name, t in theta0.items()}
        self.tasks = list(experts)
        self.taus, self.private = {}, {}
        for task, state in experts.items():
            self.taus[task], self.private[task] = merging.task_vectors(self.theta0, state)

    def num_params(self) -> int:
        return sum(t.numel() for t in self.theta0.values())

    def stacked(self, tasks: Sequence[str]) -> list[StateDict]:
        return [self.taus[t] for t in tasks]


def add_vector(theta0: StateDict, delta: StateDict, scale: float = 1.0) -> dict[str, Tensor]:
    return {name: theta0[name] + scale * delta[name] for name in theta0}


def _masked(theta0: StateDict, mask: StateDict, vector: StateDict, scale: float = 1.0) -> dict[str, Tensor]:
    return {name: theta0[name] + scale * (mask[name] * vector[name]) for name in theta0}


def ties_vector(pool: ExpertPool, tasks, k: float = 0.2, dare_p: float | None = None, seed: int = 0) -> dict[str, Tensor]:
    """TIES merged vector at alpha = 1 (scale it for any alpha); DARE-dropped first when dare_p is given."""
    taus = pool.stacked(tasks)
    if dare_p is None:
        return merging.merge_state_dicts(taus, merging.ties, k=k, alpha=1.0)
    generator = torch.Generator().manual_seed(seed)
    return merging.merge_state_dicts(taus, lambda stack: merging.ties(merging.dare(stack, dare_p, generator), k=k))


def sum_vector(pool: ExpertPool, tasks) -> dict[str, Tensor]:
    return merging.merge_state_dicts(pool.stacked(tasks), merging.task_arithmetic, alpha=1.0)


def mmer_weights(pool: ExpertPool, tasks, tau_m: StateDict, alpha: float, lam: float) -> dict[str, dict]:
    """theta_t = theta0 + m_t * tau_star with tau_star = alpha * tau_m (tau_m: TIES at alpha = 1)."""
    tau_star = {name: alpha * v for name, v in tau_m.items()}
    return {t: _masked(pool.theta0, metrics.mmer_masks(pool.taus[t], tau_star, lam), tau_star) for t in tasks}


def emr_weights(pool: ExpertPool, tasks) -> dict[str, dict]:
    taus = pool.stacked(tasks)
    tau_uni = merging.merge_state_dicts(taus, merging.emr_elect)
    out = {}
    for task in tasks:
        mask = {name: merging.emr_masks(pool.taus[task][name].unsqueeze(0), tau_uni[name])[0] for name in tau_uni}
        abs_sum = sum(float(v.abs().sum()) for v in pool.taus[task].values())
        masked_sum = sum(float((mask[n] * tau_uni[n]).abs().sum()) for n in tau_uni)
        rescale = float(merging.emr_rescalers(torch.tensor([abs_sum]), torch.tensor([masked_sum]))[0])
        out[task] = _masked(pool.theta0, mask, tau_uni, rescale)
    return out


def tall_weights(pool: ExpertPool, tasks, tau_sum: StateDict, alpha: float, lam: float) -> dict[str, dict]:
    tau_mtl = {name: alpha * v for name, v in tau_sum.items()}
    out = {}
    for task in tasks:
        mask = {n: merging.tall_masks(pool.taus[task][n].unsqueeze(0), tau_mtl[n], lam)[0] for n in tau_mtl}
        out[task] = _masked(pool.theta0, mask, tau_mtl)
    return out


def control_weights(pool: ExpertPool, tasks, tau_m: StateDict, alpha: float, lam: float, kind: str, seed: int = 0):
    """MMER's tau_star with a control mask: 'random' (MMER's effective density) or 'sign' (1[tau_t tau_star > 0])."""
    tau_star = {name: alpha * v for name, v in tau_m.items()}
    out = {}
    for index, task in enumerate(tasks):
        mask = metrics.mmer_masks(pool.taus[task], tau_star, lam)
        if kind == "random":
            mask = metrics.random_mask_like(mask, tau_star, seed=seed + index)
        elif kind == "sign":
            mask = metrics.sign_agreement_mask(pool.taus[task], tau_star)
        else:
            raise ValueError(f"unknown mask control {kind!r}")
        out[task] = _masked(pool.theta0, mask, tau_star)
    return out


def shared_for_all(tasks, weights: dict) -> dict[str, dict]:
    return {t: weights for t in tasks}


# ---- scoring and validation grids --------------------------------------------------------------------


def score(model: nn.Module, pool: ExpertPool, weights: Mapping[str, StateDict], datasets: Mapping[str, object],
          evaluate: Callable) -> dict[str, float]:
    """Accuracy of each task's model theta_t (+ its private parameters) on datasets[task]."""
    out = {}
    with torch.no_grad():
        for task, shared in weights.items():
            model.load_state_dict({**shared, **pool.private[task]}, strict=False)
            out[task] = float(evaluate(model, datasets[task], task))
    return out


def choose_on_validation(grid: Sequence[dict], build: Callable[..., Mapping[str, StateDict]], model, pool,
                         val_sets, evaluate) -> tuple[dict, list[dict]]:
    """Scores every grid point's models on the validation sets; returns the point with the best mean
    validation accuracy (first one on ties) and the whole table."""
    table = []
    for point in grid:
        accs = score(model, pool, build(**point), val_sets, evaluate)
        table.append({**point, "val_acc": sum(accs.values()) / len(accs), **{f"val_{t}": a for t, a in accs.items()}})
    best = max(range(len(table)), key=lambda i: (table[i]["val_acc"], -i))
    return dict(grid[best]), table


def grid_points(**axes: Sequence) -> list[dict]:
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


# ---- Avalanche strategies and joint training ------------------------------------------------------------


def optimizer_for(model: nn.Module) -> torch.optim.AdamW:
    """AdamW with the experts' learning rates (experts.py): BACKBONE_LR["full"] on backbone.*, PRIVATE_LR on
    every task's private modules; no warm-up or decay (Avalanche steps the optimizer itself)."""
    from mmer_cl import experts, models

    shared, private = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            # a TaskRouter prefixes `model.`
            (shared if name.removeprefix("model.").startswith(models.SHARED_PREFIX) else private).append(param)
    return torch.optim.AdamW([{"params": shared, "lr": experts.BACKBONE_LR["full"]},
                              {"params": private, "lr": experts.PRIVATE_LR}], weight_decay=0.0)


def avalanche_strategy(name: str, router: TaskRouter, *, batch_size: int, device="cpu"):
    """A real Avalanche strategy over the multi-head model: naive | ewc | lwf | replay."""
    from avalanche.training import EWC, LwF, Naive, Replay

    optimizer = optimizer_for(router)
    common = dict(model=router, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), train_mb_size=batch_size,
                  train_epochs=1, eval_mb_size=batch_size, device=device, evaluator=None)
    if name == "naive":
        return Naive(**common)
    if name == "ewc":
        return EWC(ewc_lambda=EWC_LAMBDA, **common)
    if name == "lwf":
        return LwF(alpha=LWF_ALPHA, temperature=LWF_TEMPERATURE, **common)
    if name == "replay":
        return Replay(mem_size=REPLAY_MEM_PER_TASK * len(router.specs), **common)
    raise ValueError(f"unknown Avalanche baseline {name!r}; known: naive, ewc, lwf, replay")


def train_joint(model: nn.Module, specs: Sequence[TaskSpec], train_sets: Mapping[str, object], *, steps: int,
                batch_size: int, seed: int, progress=None) -> nn.Module:
    """Joint multi-task training (an upper bound: needs every task's data at once): `steps` AdamW steps,
    task t = step mod T, each on a batch of that task's data with its own head."""
    generator = torch.Generator().manual_seed(seed)
    loaders = {spec.name: _cycle(torch.utils.data.DataLoader(train_sets[spec.name], batch_size=batch_size, shuffle=True,
                                                             generator=generator)) for spec in specs}
    optimizer = optimizer_for(model)
    model.train()
    for step in range(steps):
        spec = specs[step % len(specs)]
        x, y = next(loaders[spec.name])[:2]
        loss = nn.functional.cross_entropy(model(x, task=spec.name), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress.update(1)
    model.eval()
    return model


def _cycle(loader):
    while True:
        yield from loader
