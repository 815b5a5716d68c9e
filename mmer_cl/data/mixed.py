"""Mixed inputs: examples that carry several modalities of one class, each part degraded, for the expansion
setting (mmer_cl.expansion). Nothing here knows of merging.

`MixedSet(pools, n, seed)` draws n examples from aligned single-modality datasets (same label ids in every
pool, e.g. data.aligned): example i has class c_i, dealt round-robin over the classes every pool covers (so
the set is class-balanced), and one example of class c_i drawn at random from each pool. Items are
({task: x}, y); torch's default collate batches them into {task: [B, ...]}.

Degradations, so that no single part is enough: `noisy_images` (additive Gaussian noise of std `sigma` on
the image in [0, 1]), `truncated_texts` (the first `keep` word pieces of a gloss, then [SEP]); audio is
degraded where it is made, at a lower SNR (data.aligned, snr_db).
"""

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mmer_cl.data.common import LabelledTensors, targets_of

SEP_ID = 102  # the backbone tokenizer's [SEP]


class MixedSet(Dataset):
    """n class-balanced mixed examples from `pools` (task -> dataset); `.sources` [n, len(pools)] holds the
    index each part was drawn from, `.targets` the classes."""

    def __init__(self, pools: dict[str, Dataset], n: int, seed: int = 0, classes: Sequence[int] | None = None):
        self.pools, self.tasks = pools, list(pools)
        by_class = [{int(c): torch.nonzero(targets_of(pool) == c).flatten() for c in torch.unique(targets_of(pool))}
                    for pool in pools.values()]
        covered = sorted(set.intersection(*(set(members) for members in by_class)))
        if classes is not None:
            covered = [c for c in covered if c in set(classes)]
        if not covered:
            raise ValueError(f"the pools {self.tasks} share no class")
        self.classes = covered
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=generator)
        self.targets = torch.tensor(covered)[order % len(covered)]
        self.sources = torch.stack([torch.stack([m[int(y)][torch.randint(len(m[int(y)]), (), generator=generator)]
                                                 for y in self.targets]) for m in by_class], dim=1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        parts = {task: self.pools[task][int(self.sources[index, k])][0] for k, task in enumerate(self.tasks)}
        return parts, int(self.targets[index])

    def batches(self, batch_size: int = 128):
        """{task: inputs} batches in order, without the labels."""
        for parts, _ in DataLoader(self, batch_size=batch_size, shuffle=False):
            yield parts


def noisy_images(dataset: LabelledTensors, sigma: float, seed: int = 0) -> LabelledTensors:
    """The images plus N(0, sigma^2) noise per pixel, drawn once from `seed` (so every method sees the same)."""
    images = (dataset.transform(dataset.inputs) if dataset.transform is not None else dataset.inputs).float()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return LabelledTensors(images + sigma * noise, dataset.targets)


def truncated_texts(dataset: LabelledTensors, keep: int) -> LabelledTensors:
    """Token ids cut to [CLS] + the first `keep` word pieces + [SEP], zero-padded to the same length."""
    ids: Tensor = dataset.inputs.clone()
    lengths = (ids != 0).sum(1)
    for row, length in enumerate(lengths.tolist()):
        if length > keep + 2:
            ids[row, keep + 1] = SEP_ID
            ids[row, keep + 2:] = 0
    return LabelledTensors(ids, dataset.targets, **dataset.columns)
