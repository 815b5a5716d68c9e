"""The thin layer between Avalanche and the benchmark's mini multimodal models.

Avalanche speaks in integer task labels and batches of tensors; a MiniMLLM takes a task name and that task's
input (an image, log-mel features, token ids):
- `TaskSpec` says what task label t means: task name, modality, input shape and dtype, number of classes;
- `PackedInputs` flattens every input to one float32 vector of a common length, so that experiences of
  different modalities batch together (Avalanche's replay concatenates buffer and current data);
- `TaskRouter`, a MultiTaskModule, unpacks the inputs of task label t and runs `model(x, task=name_t)`,
  logits padded to a common width with -1e4 so that argmax and cross-entropy ignore absent classes.
Strategy pieces: `FineTuning`, the experts' recipe (experts.py: warm-up then linear decay, gradient norm
clipped) as a plugin; `LearningCurve`, where an expert stands during its training; `SampleCorrectness`,
which keeps per-sample right/wrong; and `ExpertReplay`, a strategy whose "training" on experience t loads a model
trained before (an expert saved by `SaveModels`), so that every merging method runs as an Avalanche
strategy with MMERPlugin on the same experts.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn
from torch.utils.data import Dataset

from mmer_cl import checkpoints, experts

MASKED_LOGIT = -1e4


@dataclass(frozen=True)
class TaskSpec:
    """What Avalanche task label t stands for: task `name`, its `modality`, the shape and dtype of one input,
    and its number of classes (labels 0..num_classes-1 within the task)."""

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
        return nn.functional.pad(flat, (0, self.length - flat.numel())), y


def packed_length(specs: Sequence[TaskSpec]) -> int:
    return max(spec.numel for spec in specs)


class TaskRouter(MultiTaskModule):
    """Avalanche multi-task module over a model with forward(x, task=name): task label t -> specs[t]."""

    def __init__(self, model: nn.Module, specs: Sequence[TaskSpec]):
        super().__init__()
        self.model, self.specs = model, list(specs)
        self.num_outputs = max(spec.num_classes for spec in self.specs)
        self.max_class_label = self.num_outputs

    def unpack(self, x: Tensor, task_label: int) -> Tensor:
        spec = self.specs[task_label]
        return x[:, : spec.numel].reshape(len(x), *spec.input_shape).to(spec.input_dtype)

    def features(self, x: Tensor, task_label: int) -> Tensor:
        """The model's features of x read as task `task_label`'s input (the MiniMLLM's pooled hidden states)."""
        if not callable(getattr(type(self.model), "features", None)):
            raise ValueError(f"{type(self.model).__name__} has no features(x, task) method to route by")
        return self.model.features(self.unpack(x, task_label), task=self.specs[task_label].name)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        logits = self.model(self.unpack(x, task_label), task=self.specs[task_label].name)
        return nn.functional.pad(logits, (0, self.num_outputs - logits.shape[1]), value=MASKED_LOGIT)

    def forward(self, x: Tensor, task_labels) -> Tensor:
        if isinstance(task_labels, Tensor) and len(task_labels) and bool((task_labels == task_labels[0]).all()):
            return self.forward_single_task(x, int(task_labels[0]))
        return super().forward(x, task_labels)


def avalanche_stream(specs: Sequence[TaskSpec], train: dict, test: dict, labels: Sequence[int] | None = None,
                     **more: dict):
    """A task-labelled Avalanche benchmark: experience t = task specs[t] under task label labels[t] (default t;
    all 0 for a class-incremental learner, StreamData.learner_labels), inputs packed to one length; its
    train_stream and test_stream, and a `<name>_stream` for each further split given (e.g. val=...)."""
    from avalanche.benchmarks import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    from mmer_cl.data import as_avalanche

    length = packed_length(specs)
    labels = range(len(specs)) if labels is None else labels
    streams = {name: [as_avalanche(PackedInputs(sets[spec.name], length), label) for label, spec in zip(labels, specs)]
               for name, sets in {"train": train, "test": test, **more}.items()}
    return with_classes_timeline(with_task_labels(benchmark_from_datasets(**streams)))


def optimizer_for(model: nn.Module, shared: Callable[[str], bool]) -> torch.optim.AdamW:
    """AdamW with the experts' learning rates: the small one on the shared parameters, the large one on
    every task's private modules; no weight decay, fused (experts.py says why)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for n, p in params if shared(n)], "lr": experts.BACKBONE_LR["full"]},
                              {"params": [p for n, p in params if not shared(n)], "lr": experts.PRIVATE_LR}],
                             weight_decay=0.0, fused=True)


class FineTuning(SupervisedPlugin):
    """The experts' recipe inside any Avalanche strategy: per experience, the learning rates rise linearly
    over the first steps and decay linearly to 0 (experts.schedule), and the gradient norm is clipped.
    shared_lr_scale: {experience: factor} on the shared parameters' rate (optimizer_for's first group)."""

    def __init__(self, shared_lr_scale: dict[int, float] | None = None):
        super().__init__()
        self.shared_lr_scale = shared_lr_scale or {}

    def before_training_exp(self, strategy, **kwargs):
        groups = strategy.optimizer.param_groups
        self.base_lrs = [group.setdefault("initial_lr", group["lr"]) for group in groups]
        self.base_lrs[0] *= self.shared_lr_scale.get(int(strategy.experience.current_experience), 1.0)
        self.total = strategy.train_epochs * len(strategy.dataloader)
        self.step = 0
        self._set(strategy)

    def _set(self, strategy):
        factor = experts.schedule(self.step, self.total)
        for group, lr in zip(strategy.optimizer.param_groups, self.base_lrs):
            group["lr"] = lr * factor

    def after_backward(self, strategy, **kwargs):
        torch.nn.utils.clip_grad_norm_(strategy.model.parameters(), experts.MAX_GRAD_NORM)

    def after_update(self, strategy, **kwargs):
        self.step += 1
        self._set(strategy)


class SaveModels(SupervisedPlugin):
    """After each training experience t, the model's weights as `<folder>/<t>/model.safetensors`."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = Path(folder)

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs):
        target = self.folder / str(strategy.experience.current_experience)
        checkpoints.save(target, {n: t.detach().clone() for n, t in strategy.model.state_dict().items()})


class LearningCurve(SupervisedPlugin):
    """Where an expert stands: `evaluate(t, split)` on its own task's validation and test sets before its
    first step, every `every` steps, and once trained (list it before a plugin that changes the trained model,
    as MMERPlugin's fold does). Rows: task index, split, step, accuracy."""

    def __init__(self, evaluate: Callable[[int, str], float], every: int):
        super().__init__()
        self.evaluate, self.every, self.rows = evaluate, every, []

    @torch.no_grad()
    def _record(self, strategy) -> None:
        t = int(strategy.experience.current_experience)
        for split in ("val", "test"):
            self.rows.append({"task": t, "split": split, "step": self.step, "acc": self.evaluate(t, split)})

    def before_training_exp(self, strategy, **kwargs):
        self.step = 0

    def before_training_iteration(self, strategy, **kwargs):  # the model after `step` steps
        if self.step % self.every == 0:
            self._record(strategy)

    def after_training_iteration(self, strategy, **kwargs):
        self.step += 1

    def after_training_exp(self, strategy, **kwargs):
        self._record(strategy)


class SampleCorrectness(SupervisedPlugin):
    """Whether each test sample was answered right, per evaluation experience, in the latest evaluation:
    the paired scores behind stats.paired_bootstrap. Read after Avalanche's accuracy (and after any plugin
    that replaces the outputs, as MMERPlugin does when it routes)."""

    def __init__(self):
        super().__init__()
        self.correct: dict[int, list[int]] = {}

    def before_eval(self, strategy, **kwargs):
        self.correct = {}

    def after_eval_iteration(self, strategy, **kwargs):
        right = (strategy.mb_output.argmax(dim=1) == strategy.mb_y).int().tolist()
        self.correct.setdefault(int(strategy.experience.current_experience), []).extend(right)


class ExpertReplay(SupervisedTemplate):
    """A strategy that trains nothing: on experience t it loads the weights `load(t)` returns (a model trained
    before, e.g. one SaveModels wrote), then its plugins see an ordinary training experience."""

    def __init__(self, *, model: nn.Module, load: Callable[[int], dict], **kwargs):
        placeholder = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0)  # never stepped
        super().__init__(model=model, optimizer=placeholder, train_epochs=1, **kwargs)
        self.load = load

    def make_optimizer(self, **kwargs):
        """Nothing is optimized."""

    @torch.no_grad()
    def training_epoch(self, **kwargs):
        self.model.load_state_dict(self.load(self.experience.current_experience), strict=False)
