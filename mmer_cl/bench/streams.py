"""Streams: what a benchmark run learns, task by task, and the built-in ones.

A stream function fn(profile, seed) -> StreamData, registered with `@stream(name)` (or named on the command
line as module:function), returns its tasks in order (task label t = specs[t]) with per-task train, val and
test datasets of (x, y) pairs that carry `.targets`, and how many optimizer steps each task gets. It may
bring its own model factory: a module with `forward(x, task=name)` whose shared parameters are the ones
`shared(name)` selects (the default: the library's mini multimodal LLM, shared `backbone.*`).

Built-in streams:
- modality: vision (Fashion-MNIST) -> audio (spoken words) -> text (WordNet glosses), one expert each;
- split_fmnist: Fashion-MNIST classes {0,1}, {2,3}, ... {8,9} as 5 tasks with task labels (labels 0/1 per
  task), each task a fifth of the profile's steps and examples.
- split_fmnist_ci: the same tasks, steps and examples, class-incremental (protocol "class"): the original labels
  0..9, no task label at test; one learner shares one 10-way head over every experience, MMER routes each sample.
- forgetting: the modality stream's vision and audio tasks, for the forgetting scenario (methods.py: a model
  fine-tuned on vision, then further on audio at three times the backbone's rate; MMER over the two task vectors).
- aligned: the ten Fashion-MNIST classes as images, spoken names and WordNet glosses (data.aligned), one
  expert per modality answering in the backbone's shared answer space (models.AnswerScores), and mixed
  validation and test sets of every pair and the triple of modalities, each part degraded (DEGRADATION), for
  the expansion benchmark (bench/expansion.py).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from mmer_cl import data as data_module
from mmer_cl import models
from mmer_cl.data import aligned, mixed
from mmer_cl.bench.glue import TaskSpec
from mmer_cl.bench.profiles import Profile
from mmer_cl.bench.registry import stream


def backbone_shared(name: str) -> bool:
    return name.startswith(models.SHARED_PREFIX)


@dataclass
class StreamData:
    """One stream (module docstring). new_model() builds a fresh model holding every task's modules."""

    name: str
    specs: list[TaskSpec]
    train: dict
    val: dict
    test: dict
    steps: int
    batch_size: int
    new_model: Callable[[], nn.Module] | None = None
    shared: Callable[[str], bool] = field(default=backbone_shared)
    methods: tuple | None = None  # the methods this stream is for (None: every method that applies)
    shared_lr_scale: dict = field(default_factory=dict)  # task -> factor on the shared rate in the sequential baselines
    mixed: dict = field(default_factory=dict)  # split -> {combination: data.mixed.MixedSet}, for expansion
    settings: dict = field(default_factory=dict)  # values outside the stream function that decide its data (keyed)
    protocol: str = "task"  # "class": one label space over all tasks and no task label at test (learner_specs)

    @property
    def tasks(self) -> list[str]:
        return [spec.name for spec in self.specs]

    @property
    def learner_labels(self) -> list[int]:
        """The task label of each experience for one continual learner (Avalanche's strategies, joint training):
        t, its own task's modules (task-incremental), or 0 for every experience (class-incremental: nothing tells
        the tasks apart, so all share the first task's modules and its head over the whole label space)."""
        return [0 if self.protocol == "class" else t for t in range(len(self.specs))]

    @property
    def learner_specs(self) -> list[TaskSpec]:
        """What task label l means to that learner: learner_specs[l]."""
        return self.specs[: max(self.learner_labels) + 1]

    def model(self, specs: list[TaskSpec] | None = None) -> nn.Module:
        """A new model holding the modules of `specs` (default: every task's; a stream's own new_model() builds
        what it builds), with the same initial weights every time (drawn from seed 0, torch's global generator
        left as it was): theta0 of the experts, of a replay and of every baseline is one, whatever ran before."""
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return self._build(self.specs if specs is None else specs)

    def _build(self, specs: list[TaskSpec]) -> nn.Module:
        if self.new_model is not None:
            return self.new_model()
        return models.build_model([(s.name, s.modality, s.num_classes) + (() if s.modality == "text" else (s.input_shape,))
                                   for s in specs])

    def check(self) -> "StreamData":
        """What a stream must return, checked before any training: a clear message naming what is wrong."""
        if not self.specs:
            raise ValueError(f"stream '{self.name}' has no tasks")
        if self.protocol not in ("task", "class"):
            raise ValueError(f"stream '{self.name}': protocol must be 'task' or 'class', not {self.protocol!r}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"stream '{self.name}': task names repeat: {self.tasks}")
        for spec in self.specs:
            for split in ("train", "val", "test"):
                dataset = getattr(self, split).get(spec.name)
                where = f"stream '{self.name}', task '{spec.name}', {split} split"
                if dataset is None or len(dataset) == 0:
                    raise ValueError(f"{where}: missing or empty")
                if not hasattr(dataset, "targets"):
                    raise ValueError(f"{where}: a {type(dataset).__name__} without .targets (one label per example); "
                                     f"wrap it, e.g. data.LabelledTensors(inputs, targets)")
                x, y = dataset[0][:2]
                if tuple(torch.as_tensor(x).shape) != tuple(spec.input_shape):
                    raise ValueError(f"{where}: inputs of shape {tuple(torch.as_tensor(x).shape)}, the task's spec "
                                     f"says {tuple(spec.input_shape)}")
                labels = torch.as_tensor(list(dataset.targets))
                if int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes:
                    raise ValueError(f"{where}: labels span {int(labels.min())}..{int(labels.max())}, the task has "
                                     f"{spec.num_classes} classes")
        if self.new_model is None:
            for spec in self.specs:
                models.task_spec(spec.modality, spec.num_classes, None if spec.modality == "text" else spec.input_shape,
                                 name=spec.name)
        return self


def spec_of(name: str, modality: str, dataset, num_classes: int) -> TaskSpec:
    x = torch.as_tensor(dataset[0][0])
    return TaskSpec(name, modality, tuple(x.shape), x.dtype, num_classes)


def subsets(splits, profile: Profile, seed: int, scale: float = 1.0):
    """Seeded stratified train / val / test subsets of the profile's sizes times `scale` (None: whole)."""
    def size(n):
        return None if n is None else max(16, round(n * scale))
    return tuple(data_module.subset(split, size(n), seed) for split, n in (
        (splits.train, profile.train_per_task), (splits.val, profile.val_per_task), (splits.test, profile.test_per_task)))


@stream("modality")
def modality_stream(profile: Profile, seed: int) -> StreamData:
    specs, train, val, test = [], {}, {}, {}
    for modality in ("vision", "audio", "text"):
        splits = data_module.load(modality, seed)
        train[modality], val[modality], test[modality] = subsets(splits, profile, seed)
        specs.append(spec_of(modality, modality, splits.train, len(splits.classes)))
    return StreamData("modality", specs, train, val, test, profile.steps, profile.batch_size)


class ClassPair(torch.utils.data.Dataset):
    """The examples of classes (a, b) relabelled 0 and 1 (relabel=False: their own labels a and b): one task of
    Split Fashion-MNIST."""

    def __init__(self, dataset, classes: tuple[int, int], relabel: bool = True):
        targets = torch.as_tensor(list(dataset.targets))
        self.dataset = dataset
        self.indices = torch.nonzero((targets == classes[0]) | (targets == classes[1])).flatten().tolist()
        self.targets = [int(targets[i] == classes[1]) if relabel else int(targets[i]) for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.dataset[self.indices[index]][0], self.targets[index]


# What a class-incremental stream can score: every other method picks a task's private modules by its label.
# individual, each expert given its task label, stays as the oracle that the routed accuracy is compared with.
CLASS_INCREMENTAL_METHODS = ("individual", "mmer_routed", "mmer_routed_entropy", "naive", "ewc", "lwf", "replay",
                             "joint")


@stream("split_fmnist")
def split_fmnist_stream(profile: Profile, seed: int, protocol: str = "task") -> StreamData:
    """Two classes need fewer steps and examples than ten: each task gets a fifth of the profile's.
    protocol "class": the same examples with their own labels 0..9, every task's head 10-way (split_fmnist_ci)."""
    splits = data_module.load("vision", seed)
    steps = max(1, profile.steps // 5)
    relabel = protocol == "task"
    specs, train, val, test = [], {}, {}, {}
    for pair in [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]:
        name = f"fmnist_{pair[0]}{pair[1]}"
        parts = [ClassPair(split, pair, relabel) for split in (splits.train, splits.val, splits.test)]
        train[name] = data_module.subset(parts[0], steps * profile.batch_size, seed)
        val[name] = data_module.subset(parts[1], None if profile.val_per_task is None else max(16, profile.val_per_task // 2), seed)
        test[name] = data_module.subset(parts[2], None if profile.test_per_task is None else max(32, profile.test_per_task // 2), seed)
        specs.append(spec_of(name, "vision", splits.train, 2 if relabel else 10))
    if relabel:
        return StreamData("split_fmnist", specs, train, val, test, steps, profile.batch_size)
    return StreamData("split_fmnist_ci", specs, train, val, test, steps, profile.batch_size, protocol="class",
                      methods=CLASS_INCREMENTAL_METHODS)


@stream("split_fmnist_ci")
def split_fmnist_ci_stream(profile: Profile, seed: int) -> StreamData:
    """Class-incremental Split Fashion-MNIST: split_fmnist's tasks, steps and examples, labels 0..9."""
    return split_fmnist_stream(profile, seed, protocol="class")


@stream("forgetting")
def forgetting_stream(profile: Profile, seed: int) -> StreamData:
    modality = modality_stream(profile, seed)
    keep = modality.specs[:2]
    return StreamData("forgetting", keep, *({s.name: getattr(modality, part)[s.name] for s in keep}
                                            for part in ("train", "val", "test")),
                      modality.steps, modality.batch_size, methods=("forgetting",),
                      shared_lr_scale={keep[1].name: 3.0})  # audio at 3x the backbone's rate: vision really lost


# Each part of a mixed input degraded until no single modality is enough: image noise std on [0, 1] pixels,
# speech SNR in dB, word pieces kept of a gloss. Chosen on validation with a first training of the default
# profile's experts (seed 0), where the single experts then scored 0.52 (vision, clean 0.68), 0.44 (audio, clean
# 0.89) and 0.61 (text, clean 0.87); results/aligned_expansion.md has them on test.
DEGRADATION = {"image_noise": 0.5, "snr_db": -3.0, "text_tokens": 2}
COMBINATIONS = (("vision", "audio"), ("vision", "text"), ("audio", "text"), ("vision", "audio", "text"))


def degraded_pools(split: str, seed: int, clean: dict) -> dict:
    """The val or test sets of each modality at DEGRADATION's levels (audio re-synthesised at that SNR)."""
    level = DEGRADATION
    audio = getattr(aligned.load_aligned("audio", seed, snr_db=(level["snr_db"],) * 2), split)
    return {"vision": mixed.noisy_images(clean["vision"], level["image_noise"], seed), "audio": audio,
            "text": mixed.truncated_texts(clean["text"], level["text_tokens"])}


@stream("aligned")
def aligned_stream(profile: Profile, seed: int) -> StreamData:
    """Experts on clean single-modality data; mixed sets of 2x the profile's test size per combination."""
    specs, train, val, test, whole = [], {}, {}, {}, {}
    for modality in ("vision", "audio", "text"):
        splits = aligned.load_aligned(modality, seed)
        train[modality], val[modality], test[modality] = subsets(splits, profile, seed)
        whole[modality] = {"val": splits.val, "test": splits.test}
        specs.append(spec_of(modality, modality, splits.train, len(splits.classes)))
    answers = {s.name: models.task_spec(s.modality, s.num_classes, None if s.modality == "text" else s.input_shape,
                                        name=s.name, answers=aligned.CLASS_NAMES) for s in specs}
    sizes = {"val": profile.val_per_task or 1000, "test": 2 * (profile.test_per_task or 1000)}
    sets = {}
    for split, n in sizes.items():
        pools = degraded_pools(split, seed, {m: whole[m][split] for m in whole})
        sets[split] = {"+".join(c): mixed.MixedSet({m: pools[m] for m in c}, n, seed) for c in COMBINATIONS}
    return StreamData("aligned", specs, train, val, test, profile.steps, profile.batch_size,
                      new_model=lambda: models.on_pretrained_backbone(answers, seed=seed),
                      methods=("individual", "mmer_exact", "expansion"), mixed=sets, settings=dict(DEGRADATION))
