"""What the three loaders share: the cache folder, the split container, a tensor-backed dataset, seeded
stratified subsets and the bridge to Avalanche datasets."""

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset


def cache_dir() -> Path:
    """Where generated and unpacked data live: $MMER_CACHE, else ~/.cache/mmer_cl."""
    return Path(os.environ.get("MMER_CACHE") or Path.home() / ".cache" / "mmer_cl")


class MissingDataError(FileNotFoundError):
    """A data source is not on this machine; the message names the Debian package that provides it."""


def missing(what: str, path: Path | str, package: str, override: str) -> MissingDataError:
    return MissingDataError(
        f"{what} not found: {path} is missing. Install the Debian package {package} "
        f"(sudo apt-get install {package}), or {override}.")


@dataclass
class Splits:
    """Seeded train / validation / test splits of one data set; validation is disjoint from both others.
    `info` records provenance and sizes (source folder, manifest, normalisation)."""

    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    info: dict = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


class LabelledTensors(Dataset):
    """Examples `(transform(inputs[i]), int(targets[i]))` held as whole tensors.

    Keyword `columns` carry per-example provenance (the source index, the voice, the gloss), each a tensor
    or list of length N, readable as attributes and kept aligned by `select`. `transform` lets inputs be
    stored compactly (Fashion-MNIST as bytes) and converted on access; it must be picklable for workers.
    """

    def __init__(self, inputs: Tensor, targets: Tensor, transform: Callable | None = None, **columns):
        targets = torch.as_tensor(targets, dtype=torch.long)
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        for name, values in columns.items():
            if len(values) != len(targets):
                raise ValueError(f"column {name!r} has {len(values)} entries, expected {len(targets)}")
        self.inputs, self.targets, self.transform, self.columns = inputs, targets, transform, columns
        for name, values in columns.items():
            setattr(self, name, values)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        x = self.inputs[index]
        return (self.transform(x) if self.transform is not None else x), int(self.targets[index])

    def select(self, indices: Sequence[int] | Tensor) -> "LabelledTensors":
        index = torch.as_tensor(indices, dtype=torch.long)
        columns = {name: values[index] if isinstance(values, Tensor) else [values[i] for i in index.tolist()]
                   for name, values in self.columns.items()}
        return LabelledTensors(self.inputs[index], self.targets[index], self.transform, **columns)


class TargetSubset(Subset):
    """torch Subset that keeps a `.targets` LongTensor, so it can be subset again or given to Avalanche."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        super().__init__(dataset, list(indices))
        self.targets = targets_of(dataset)[torch.as_tensor(self.indices, dtype=torch.long)]


def targets_of(dataset: Dataset) -> Tensor:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ValueError(f"{type(dataset).__name__} has no .targets; the data helpers need one label per example")
    return torch.as_tensor(list(targets) if not isinstance(targets, Tensor) else targets, dtype=torch.long)


def stratified_indices(targets: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """n indices drawn without replacement, each class keeping its share: floor(n * n_c / N) per class, the
    remaining few to the classes with the largest remainders. Sorted."""
    classes, counts = torch.unique(targets, return_counts=True)
    exact = counts.double() * n / len(targets)
    quota = exact.floor().long()
    short = n - int(quota.sum())
    quota[torch.argsort(exact - quota, descending=True, stable=True)[:short]] += 1
    chosen = []
    for label, q in zip(classes.tolist(), quota.tolist()):
        members = torch.nonzero(targets == label).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:q]])
    return torch.cat(chosen).sort().values


def subset(dataset: Dataset, n: int | None, seed: int = 0) -> Dataset:
    """A seeded class-stratified sample of n examples, for small runs (the dataset itself if n is None or
    n >= len). LabelledTensors stay LabelledTensors (with their provenance columns); other datasets with a
    `.targets` become a TargetSubset."""
    if n is None or n >= len(dataset):
        return dataset
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n}")
    index = stratified_indices(targets_of(dataset), n, torch.Generator().manual_seed(seed))
    if isinstance(dataset, LabelledTensors):
        return dataset.select(index)
    return TargetSubset(dataset, index.tolist())


def as_avalanche(dataset: Dataset, task_label: int = 0):
    """The dataset as an Avalanche 0.6 classification dataset with `targets` and `targets_task_labels`
    (items become (x, y, task_label)), as `benchmark_from_datasets` and the strategies expect."""
    from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_classification_dataset

    return _make_taskaware_classification_dataset(dataset, targets=targets_of(dataset).tolist(),
                                                  task_labels=task_label)


def publish_dir(build: Callable[[Path], None], final: Path) -> Path:
    """Build a folder under a temporary name beside `final`, then rename it into place, so a reader never
    sees a half-written folder and two processes building at once both end with one complete copy."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
