"""What the benchmarks report (SPEC, "What is reported"): continual metrics over an accuracy matrix and
storage by component.

Accuracy matrix: R[t, j] is the accuracy on task j after training experience t (0-based, T x T).
    final average accuracy  A_T  = mean_j R[T-1, j]
    backward transfer       BWT  = mean_{j < T-1} (R[T-1, j] - R[j, j])
    average forgetting      F    = mean_{j < T-1} max_{j <= t < T-1} (R[t, j] - R[T-1, j])
    retention               rho_j = R[T-1, j] / acc(task j's own fine-tuned expert)
Entries not yet measurable (task j unseen at t < j) may be NaN; only seen tasks enter the formulas.

Storage is measured one way for every method: the bytes it actually keeps, files on disk or tensors in
memory (`nbytes`), split by component (`storage`). Mask analyses read a state: analysis.py.
"""

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from torch import Tensor


# ---- continual metrics over R ---------------------------------------------------------------------


def _square(matrix) -> np.ndarray:
    R = np.asarray(matrix, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"an accuracy matrix is T x T with T >= 1, got shape {R.shape}")
    return R


def final_average_accuracy(matrix) -> float:
    """A_T = mean_j R[T-1, j]."""
    return float(np.mean(_square(matrix)[-1]))


def backward_transfer(matrix) -> float:
    """BWT = mean_{j < T-1} (R[T-1, j] - R[j, j]); negative means forgetting; 0 for T = 1."""
    R = _square(matrix)
    T = len(R)
    if T == 1:
        return 0.0
    return float(np.mean([R[-1, j] - R[j, j] for j in range(T - 1)]))


def average_forgetting(matrix) -> float:
    """F = mean_{j < T-1} max_{j <= t < T-1} (R[t, j] - R[T-1, j]) (Chaudhry et al. 2018); 0 for T = 1."""
    R = _square(matrix)
    T = len(R)
    if T == 1:
        return 0.0
    return float(np.mean([np.max(R[j : T - 1, j]) - R[-1, j] for j in range(T - 1)]))


def retention(matrix, expert_accuracy) -> np.ndarray:
    """rho_j = R[T-1, j] / acc_j of task j's own expert."""
    R = _square(matrix)
    expert = np.asarray(expert_accuracy, dtype=float)
    if expert.shape != (len(R),):
        raise ValueError(f"need one expert accuracy per task ({len(R)}), got shape {expert.shape}")
    return R[-1] / expert


def summarize(matrix, expert_accuracy=None) -> dict:
    """The scalar metrics of one accuracy matrix (and retention when the experts' accuracies are given)."""
    out = {
        "final_avg_acc": final_average_accuracy(matrix),
        "bwt": backward_transfer(matrix),
        "avg_forgetting": average_forgetting(matrix),
    }
    if expert_accuracy is not None:
        out["retention"] = float(np.mean(retention(matrix, expert_accuracy)))
    return out


# ---- storage ----------------------------------------------------------------------------------------

STORAGE_COMPONENTS = ("base", "shared_vectors", "masks", "adapters", "private", "buffer", "router")


def nbytes(*kept) -> int:
    """The bytes of what a method keeps: files or folders on disk (their sizes), tensors, mappings or
    sequences of either, a dataset (each example's tensors); None is nothing."""
    total = 0
    for thing in kept:
        if thing is None:
            continue
        if isinstance(thing, (str, Path)):
            path = Path(thing)
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
        elif isinstance(thing, Tensor):
            total += thing.numel() * thing.element_size()
        elif isinstance(thing, Mapping):
            total += nbytes(*thing.values())
        elif isinstance(thing, (list, tuple)):
            total += nbytes(*thing)
        elif hasattr(thing, "__getitem__") and hasattr(thing, "__len__"):  # a dataset (torch's, Avalanche's)
            total += sum(nbytes(*[t for t in thing[i] if isinstance(t, Tensor)]) for i in range(len(thing)))
        else:
            raise TypeError(f"cannot measure the storage of a {type(thing).__name__}")
    return total


def storage(**components: int) -> dict:
    """Bytes by component (SPEC: base, shared vectors, masks, adapters, private; a replay buffer; a router's
    statistics), plus total."""
    unknown = set(components) - set(STORAGE_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown storage components {sorted(unknown)}; known: {STORAGE_COMPONENTS}")
    out = {name: int(components.get(name, 0)) for name in STORAGE_COMPONENTS}
    out["total"] = sum(out.values())
    return out
