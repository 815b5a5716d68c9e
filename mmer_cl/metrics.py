"""What the benchmarks report (SPEC, "What is reported"): continual metrics over an accuracy matrix,
storage by component, and the mask analyses with their controls.

Accuracy matrix: R[t, j] is the accuracy on task j after training experience t (0-based, T x T).
    final average accuracy  A_T  = mean_j R[T-1, j]
    backward transfer       BWT  = mean_{j < T-1} (R[T-1, j] - R[j, j])
    average forgetting      F    = mean_{j < T-1} max_{j <= t < T-1} (R[t, j] - R[T-1, j])
    retention               rho_j = R[T-1, j] / acc(task j's own fine-tuned expert)
Entries not yet measurable (task j unseen at t < j) may be NaN; only seen tasks enter the formulas.

Masks, task vectors and tau_star are state dicts {parameter name: tensor} over the shared parameters.
"""

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from mmer_cl import merging

StateDict = Mapping[str, Tensor]


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

STORAGE_COMPONENTS = ("base", "shared_vectors", "masks", "adapters", "private", "buffer")


def tensor_bytes(tensors: StateDict | None) -> int:
    return 0 if tensors is None else sum(t.numel() * t.element_size() for t in tensors.values())


def mask_bytes(num_params: int, num_tasks: int) -> int:
    """Bit-packed masks: ceil(N / 8) bytes per task (merging.pack_mask)."""
    return num_tasks * math.ceil(num_params / 8)


def storage(**components: int) -> dict:
    """Bytes by component (SPEC: base, shared vectors, masks, adapters, private; and a replay buffer), plus total."""
    unknown = set(components) - set(STORAGE_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown storage components {sorted(unknown)}; known: {STORAGE_COMPONENTS}")
    out = {name: int(components.get(name, 0)) for name in STORAGE_COMPONENTS}
    out["total"] = sum(out.values())
    return out


# ---- mask analyses -----------------------------------------------------------------------------------


def layer_of(name: str) -> str:
    """'backbone.encoder.layer.3.attention.self.query.weight' -> 'backbone.encoder.layer.3'; others: the module."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def mask_density(mask: StateDict, tau_star: StateDict) -> dict:
    """Raw density (ones / entries) and effective density (ones / entries where tau_star != 0), overall
    and per layer. With lam <= 1 every entry where tau_star = 0 passes, so the raw density flatters."""
    by_layer: dict[str, list[int]] = {}  # layer -> [entries, ones, nonzero entries, ones where nonzero]
    for name, m in mask.items():
        nonzero = tau_star[name] != 0
        acc = by_layer.setdefault(layer_of(name), [0, 0, 0, 0])
        acc[0] += m.numel()
        acc[1] += int(m.sum())
        acc[2] += int(nonzero.sum())
        acc[3] += int((m & nonzero).sum())
    total = np.sum(list(by_layer.values()), axis=0)
    return {
        "raw": total[1] / max(total[0], 1),
        "effective": total[3] / max(total[2], 1),
        "per_layer": {layer: {"raw": a[1] / max(a[0], 1), "effective": a[3] / max(a[2], 1)} for layer, a in by_layer.items()},
    }


def mask_overlap(mask_a: StateDict, mask_b: StateDict, tau_star: StateDict) -> float:
    """Jaccard overlap |a & b| / |a | b| over the entries where tau_star != 0 (where a mask decides anything)."""
    inter = union = 0
    for name, a in mask_a.items():
        nonzero = tau_star[name] != 0
        b = mask_b[name]
        inter += int((a & b & nonzero).sum())
        union += int(((a | b) & nonzero).sum())
    return inter / union if union else 1.0


def reconstruction_error(tau: StateDict, mask: StateDict, tau_star: StateDict) -> float:
    """||theta_hat_i - theta_i|| / ||tau_i|| = ||m_i * tau_star - tau_i||_2 / ||tau_i||_2 over all shared entries."""
    num = den = 0.0
    for name, t in tau.items():
        num += float(((mask[name] * tau_star[name]) - t).pow(2).sum())
        den += float(t.pow(2).sum())
    return math.sqrt(num) / math.sqrt(den) if den > 0 else 0.0


def mmer_masks(tau: StateDict, tau_star: StateDict, lam: float = 1.0) -> dict[str, Tensor]:
    """MMER's mask of one task over a whole model: m = 1[|tau| >= lam * |tau - tau_star|] (merging.mmer_mask)."""
    return {name: merging.mmer_mask(t, tau_star[name], lam) for name, t in tau.items()}


def sign_agreement_mask(tau: StateDict, tau_star: StateDict) -> dict[str, Tensor]:
    """Control: m = 1[tau * tau_star > 0], the plain sign-agreement mask (EMR's rule on tau_star)."""
    return {name: t * tau_star[name] > 0 for name, t in tau.items()}


def random_mask_like(mask: StateDict, tau_star: StateDict, seed: int = 0) -> dict[str, Tensor]:
    """Control: a random mask with the same effective density as `mask` on each tensor's tau_star != 0
    entries (ones elsewhere, as MMER's mask is there when lam <= 1), drawn with a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in mask.items():
        nonzero = tau_star[name] != 0
        density = float((m & nonzero).sum()) / max(int(nonzero.sum()), 1)
        draw = torch.rand(m.shape, generator=generator) < density
        out[name] = torch.where(nonzero, draw, m)
    return out
