"""MMER as an Avalanche continual strategy, and the thin glue between Avalanche and our models.

Avalanche speaks in integer task labels and batches of tensors; our models take a task name and that task's
input (an image, log-mel features, token ids). The glue:
- `TaskSpec` names what Avalanche's task label t means: task name, modality, input shape and dtype, classes;
- `PackedInputs` flattens every input to one float32 vector of a common length, so that experiences of
  different modalities batch together (Avalanche's replay concatenates buffer and current data);
- `TaskRouter`, a MultiTaskModule: unpacks the inputs of task label t and runs `model(x, task=name_t)`,
  logits padded to a common width with -1e4 so that argmax and cross-entropy ignore absent classes.

`MMERStrategy` (SPEC, "Continual") trains nothing by gradient: for each training experience it obtains an
expert (fine-tuned from theta0 on that experience's data, or a checkpoint or LoRA adapter handed in), folds it
into the state with `fold.fold` (tau_star = alpha * TIES(tau_1..tau_T), every mask refreshed), and at
evaluation switches the live model to theta0 + m_t * tau_star for the experience's task label. Without task
labels it infers the task per sample by the lowest predictive entropy over the candidate tasks' decoupled
models (the folded tasks of the input's modality) and logs how often the inference was right.
"""

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from avalanche.models import MultiTaskModule
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import Dataset

from mmer_cl import fold

MASKED_LOGIT = -1e4


@dataclass(frozen=True)
class TaskSpec:
    """What Avalanche task label t stands for: our task `name`, its `modality`, the shape and dtype of one
    input, and its number of classes (labels 0..num_classes-1 within the task)."""

    name: str
    modality: str
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    num_classes: int

    @property
    def numel(self) -> int:
        return math.prod(self.input_shape)


class PackedInputs(Dataset):
    """x -> flat float32 of length `length` (zero-padded), y unchanged; exact for token ids below 2**24."""

    def __init__(self, dataset: Dataset, length: int):
        self.dataset, self.length = dataset, length
        self.targets = dataset.targets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        x, y = self.dataset[index][:2]
        flat = torch.as_tensor(x).flatten().float()
        if flat.numel() > self.length:
            raise ValueError(f"input {index} has {flat.numel()} entries, more than the packed length {self.length}")
        return torch.nn.functional.pad(flat, (0, self.length - flat.numel())), y


def packed_length(specs: Sequence[TaskSpec]) -> int:
    return max(spec.numel for spec in specs)


class TaskRouter(MultiTaskModule):
    """Avalanche multi-task module over a model with forward(x, task=name): task label t -> specs[t]."""

    def __init__(self, model: nn.Module, specs: Sequence[TaskSpec]):
        super().__init__()
        self.model = model
        self.specs = list(specs)
        self.num_outputs = max(spec.num_classes for spec in self.specs)
        self.max_class_label = self.num_outputs

    def unpack(self, x: Tensor, task_label: int) -> Tensor:
        spec = self.specs[task_label]
        return x[:, : spec.numel].reshape(len(x), *spec.input_shape).to(spec.input_dtype)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        logits = self.model(self.unpack(x, task_label), task=self.specs[task_label].name)
        return nn.functional.pad(logits, (0, self.num_outputs - logits.shape[1]), value=MASKED_LOGIT)

    def forward(self, x: Tensor, task_labels) -> Tensor:
        if isinstance(task_labels, Tensor) and len(task_labels) and bool((task_labels == task_labels[0]).all()):
            return self.forward_single_task(x, int(task_labels[0]))
        return super().forward(x, task_labels)


def experience_task_label(experience) -> int:
    labels = experience.task_labels
    if len(labels) != 1:
        raise ValueError(f"experience {experience.current_experience} mixes task labels {labels}; MMER folds one task per experience")
    return int(labels[0])


def predictive_entropy(logits: Tensor) -> Tensor:
    """H(p) = -sum_c p_c log p_c of softmax(logits), per row."""
    logp = torch.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1)


ExpertSource = Callable[[object, TaskSpec], Path] | Mapping[str, Path]


class MMERStrategy(SupervisedTemplate):
    """Fold-per-experience MMER over an Avalanche stream.

    model: the full model (shared backbone.* plus every task's private modules), wrapped in a TaskRouter.
    base_dir: theta0 as a transformers folder (the shared parameters only); state_dir: the MMER state store.
    expert_source: task name -> fine-tuned folder, or callable(experience, spec) -> folder (e.g. trains one).
    mode: exact | sparse | compact; k: TIES trim fraction; alpha: tau_star scale; lam: scalar or {task: lam}.
    infer_task: ignore eval task labels and infer the task by lowest predictive entropy.
    """

    def __init__(self, *, model: nn.Module, specs: Sequence[TaskSpec], base_dir, state_dir, expert_source: ExpertSource,
                 mode: str = "exact", k: float = 0.2, alpha: float = 1.0, lam: float | Mapping[str, float] = 1.0,
                 infer_task: bool = False, eval_mb_size: int = 64, device="cpu", evaluator=default_evaluator, plugins=None):
        if mode not in ("exact", "sparse", "compact"):
            raise ValueError(f"mode must be exact, sparse or compact, got {mode!r}")
        router = model if isinstance(model, TaskRouter) else TaskRouter(model, specs)
        # Avalanche wants an optimizer; MMER never steps it (make_optimizer is a no-op).
        placeholder = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0)
        super().__init__(model=router, optimizer=placeholder, train_mb_size=eval_mb_size, train_epochs=1,
                         eval_mb_size=eval_mb_size, device=device, evaluator=evaluator, plugins=plugins)
        self.specs = router.specs
        self.base_dir, self.state_dir = Path(base_dir), Path(state_dir)
        self.expert_source = expert_source
        self.mode, self.k, self.alpha, self.lam = mode, k, alpha, lam
        self.infer_task = infer_task
        self.folded: list[str] = []
        self.fold_seconds: dict[str, float] = {}
        self.inference_log: list[dict] = []  # per evaluated experience: task, inferred correctly, total
        self._switcher: fold.TaskSwitcher | None = None
        self._live_task: str | None = None

    # ---- training: obtain an expert, fold it, refresh the masks ------------------------------------------

    def make_optimizer(self, **kwargs):
        """MMER trains no parameter of the merged model."""

    def training_epoch(self, **kwargs):
        spec = self.specs[experience_task_label(self.experience)]
        if isinstance(self.expert_source, Mapping):
            expert = Path(self.expert_source[spec.name])
        else:
            expert = Path(self.expert_source(self.experience, spec))
        self.fold_expert(spec.name, expert)

    def fold_expert(self, task: str, expert_dir) -> dict:
        """Folds one fine-tuned model (folder or PEFT adapter) as task `task`; all masks are refreshed."""
        lam = self.lam[task] if isinstance(self.lam, Mapping) else self.lam
        start = time.perf_counter()
        manifest = fold.fold(self.state_dir, expert_dir, task, base=self.base_dir, mode=self.mode, k=self.k,
                             alpha=self.alpha, lam=lam, progress=False)
        self.fold_seconds[task] = time.perf_counter() - start
        self.folded.append(task)
        self._switcher, self._live_task = None, None
        return manifest

    # ---- evaluation: the decoupled model of the experience's task ----------------------------------------

    def switch(self, task: str) -> None:
        """Live weights <- theta0 + m_task * tau_star and task's private parameters; theta0 for a task not
        folded yet (its private modules stay untrained: that task is unseen)."""
        if task == self._live_task:
            return
        inner = self.model.model
        if task in self.folded:
            if self._switcher is None:
                self._switcher = fold.TaskSwitcher(inner, self.state_dir)
            self._switcher.switch(task)
        else:
            theta0 = {}
            for path in sorted(self.base_dir.glob("*.safetensors")):
                theta0.update(load_file(path))
            inner.load_state_dict(theta0, strict=False)
        self._live_task = task

    def eval_epoch(self, **kwargs):
        label = experience_task_label(self.experience)
        if not self.infer_task:
            self.switch(self.specs[label].name)
            return super().eval_epoch(**kwargs)
        return self._eval_epoch_inferred(label, **kwargs)

    @torch.no_grad()
    def _eval_epoch_inferred(self, label: int, **kwargs):
        """Per sample, the logits of the candidate task whose decoupled model is most certain
        (lowest predictive entropy); candidates are the folded tasks of the input's modality."""
        modality = self.specs[label].modality
        candidates = [t for t, spec in enumerate(self.specs) if spec.name in self.folded and spec.modality == modality]
        if not candidates:
            raise ValueError(f"no folded task of modality {modality!r} to infer the task of experience {label} from")
        outputs = []  # [candidate][batch] -> logits
        for candidate in candidates:
            self.switch(self.specs[candidate].name)
            per_batch = []
            for mbatch in self.dataloader:
                x = mbatch[0].to(self.device)
                per_batch.append(self.model.forward_single_task(x, candidate))
            outputs.append(per_batch)
        correct = total = 0
        for index, self.mbatch in enumerate(self.dataloader):
            self._unpack_minibatch()
            self._before_eval_iteration(**kwargs)
            self._before_eval_forward(**kwargs)
            stacked = torch.stack([per_batch[index] for per_batch in outputs])  # [C, B, classes]
            choice = torch.stack([predictive_entropy(logits) for logits in stacked]).argmin(dim=0)  # [B]
            self.mb_output = stacked[choice, torch.arange(stacked.shape[1])]
            chosen = torch.as_tensor(candidates)[choice]
            correct += int((chosen == label).sum())
            total += len(chosen)
            self._after_eval_forward(**kwargs)
            self.loss = self.criterion()
            self._after_eval_iteration(**kwargs)
        self.inference_log.append({"task": self.specs[label].name, "correct": correct, "total": total,
                                   "after": list(self.folded)})
