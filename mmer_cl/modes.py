"""What a state keeps of each folded task between folds (SPEC, "Continual"): one object per mode, which
encodes the new task's vector as a fold streams it and decodes an old task's vector for the next fold.

    exact    tau_i whole (float32): every merge refits exactly; a full vector per task
    sparse   trim_k(tau_i) as flat (index, value) pairs: exact for merges that need only trimmed vectors
    compact  nothing per task: an old tau_i is approximated by its decoupled delta r_i * m_i * tau_star / alpha,
             with the previous generation's tau_star, mask, rescaler and alpha (alpha divided out so that the
             next merge scales by alpha once); storage is tau_star plus one bit per parameter per task
"""

import math

import torch
from torch import Tensor

from mmer_cl import merging
from mmer_cl.checkpoints import BufferedWriter, PlannedWriter

NAMES = ("exact", "sparse", "compact")


class Exact:
    name = "exact"

    def writer(self, folder, plan_f32, shard_bytes):
        return PlannedWriter(folder, "vector", shard_bytes, plan_f32)

    def encode(self, writer, name: str, start: int, stop: int, numel: int, tau: Tensor, threshold) -> None:
        if stop > start:
            writer.write(name, tau)

    def reader(self, state, task: dict, alpha: float):
        vectors = state.vectors(task)
        return lambda name, start, stop, out: vectors.read(name, start, stop, out)


class Sparse:
    name = "sparse"

    def __init__(self):
        self._parts: list[tuple[Tensor, Tensor]] = []

    def writer(self, folder, plan_f32, shard_bytes):
        return BufferedWriter(folder, "vector", shard_bytes)

    def encode(self, writer, name: str, start: int, stop: int, numel: int, tau: Tensor, threshold: float) -> None:
        """Chunks of one tensor arrive in order; the tensor's (index, value) pairs are written at its end."""
        index = ((tau.abs() >= threshold) & (tau != 0)).nonzero().flatten()  # trim_k(tau)'s non-zero entries
        self._parts.append((index + start, tau[index]))
        if stop == numel:
            writer.write(f"{name}::index", torch.cat([p[0] for p in self._parts]))
            writer.write(f"{name}::value", torch.cat([p[1] for p in self._parts]))
            self._parts.clear()

    def reader(self, state, task: dict, alpha: float):
        vectors = state.vectors(task)
        cache: list = [None]  # one tensor's pairs; worker threads may replace it meanwhile, so read it once

        def read(name, start, stop, out):
            cached = cache[0]
            if cached is None or cached[0] != name:
                cached = cache[0] = (name, vectors.read(f"{name}::index"), vectors.read(f"{name}::value"))
            _, index, value = cached
            lo, hi = torch.searchsorted(index, torch.tensor([start, stop])).tolist()
            dense = out.zero_() if out is not None else torch.zeros(stop - start)
            dense[index[lo:hi] - start] = value[lo:hi]
            return dense
        return read


class Compact:
    name = "compact"

    def writer(self, folder, plan_f32, shard_bytes):
        return None

    def encode(self, writer, name, start, stop, numel, tau, threshold) -> None:
        pass

    def reader(self, state, task: dict, alpha: float):
        tau_star, masks = state.tau_star(), state.masks(task)
        scale = task.get("scale", 1.0)

        def read(name, start, stop, out):
            mask = merging.unpack_mask(masks.read(name, start // 8, math.ceil(stop / 8)), (stop - start,))
            delta = mask * tau_star.read(name, start, stop).float() / alpha
            delta = delta if scale == 1.0 else delta * scale
            return delta if out is None else out.copy_(delta)
        return read


def of(name: str):
    """A fresh mode object: exact, sparse or compact."""
    return {"exact": Exact, "sparse": Sparse, "compact": Compact}[name]()
