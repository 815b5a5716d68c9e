"""The merge algebra: small pure functions over tensors, composed as the formulas compose.

Notation (SPEC): theta0 the base, tau_i = theta_i - theta0 a task vector, taus the task vectors of one
parameter stacked as [T, *shape], tau_star the merged vector. Task vectors are float32 whatever the
weights' dtype, so that bf16 checkpoints do not round away small deltas; `decouple` casts back.
Functions named for a method work on one parameter; `merge_state_dicts` lifts any of them to whole models.
"""

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

StateDict = Mapping[str, Tensor]


# ---- task vectors ---------------------------------------------------------------------------


def check_finite(tensor: Tensor, name: str, where: str = "") -> None:
    """Refuses a float tensor with NaN or Inf entries, naming it (and `where` it is, e.g. "in file x")."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"tensor '{name}'{' ' + where if where else ''} has {bad} NaN or Inf entries")


def task_vector(base: Tensor, finetuned: Tensor, name: str = "tensor") -> Tensor:
    """tau = theta_i - theta0, in float32; both must agree in shape and dtype and be finite."""
    if base.shape != finetuned.shape:
        raise ValueError(
            f"tensor '{name}': shape {tuple(finetuned.shape)} in the fine-tuned model, "
            f"{tuple(base.shape)} in the base"
        )
    if base.dtype != finetuned.dtype:
        raise ValueError(f"tensor '{name}': dtype {finetuned.dtype} in the fine-tuned model, {base.dtype} in the base")
    check_finite(base, name, "of the base")
    check_finite(finetuned, name, "of the fine-tuned model")
    # Subtract in the weights' precision (float32 at least), round to float32 once: a float64 delta of 1e-12
    # survives, where casting theta_i and theta0 to float32 first would round it away.
    wide = torch.promote_types(base.dtype, torch.float32)
    return (finetuned.to(wide) - base.to(wide)).float()


def task_vectors(base: StateDict, finetuned: StateDict) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a fine-tuned model into its task vector over the base's parameters and its private ones.

    Returns (shared, private): shared[n] = finetuned[n] - base[n] for every n in base; private holds the
    fine-tuned parameters the base does not have (an encoder, projector or head of this task alone).
    """
    missing = [name for name in base if name not in finetuned]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"the fine-tuned model lacks {len(missing)} base tensors: {shown}")
    shared = {name: task_vector(base[name], finetuned[name], name) for name in base}
    private = {name: tensor for name, tensor in finetuned.items() if name not in base}
    for name, tensor in private.items():
        check_finite(tensor, name)
    return shared, private


def lora_delta(lora_A: Tensor, lora_B: Tensor, scaling: float, fan_in_fan_out: bool = False) -> Tensor:
    """Dense LoRA update Delta W = scaling * B @ A (transposed for fan_in_fan_out layers), float32.

    A is [r, in], B is [out, r]; PEFT's scaling is lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA).
    """
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"LoRA factors do not chain: A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)}")
    delta = scaling * (lora_B.float() @ lora_A.float())
    return delta.T if fan_in_fan_out else delta


# ---- TIES: trim, elect, disjoint mean -----------------------------------------------------


def _check_fraction(k: float) -> None:
    if not 0.0 <= k <= 1.0:  # also refuses NaN
        raise ValueError(f"trim fraction k must lie in [0, 1], got {k}")


def kept_count(k: float, n: int) -> int:
    """ceil(k * n), where a k * n within float error of an integer is that integer (0.07 * 100 keeps 7, not 8)."""
    wanted = k * n
    near = round(wanted)
    return near if near >= 1 and abs(wanted - near) <= 1e-9 * wanted else math.ceil(wanted)


def magnitude_threshold(tensors: Iterable[Tensor], k: float) -> float:
    """The kept_count(k, N)-th largest |entry| over all N entries of all tensors: one global trim threshold,
    exact in the tensors' own precision."""
    _check_fraction(k)
    magnitudes = torch.cat([t.detach().abs().flatten() for t in tensors])
    n_keep = kept_count(k, magnitudes.numel())
    if n_keep == 0:
        return math.inf
    return float(torch.topk(magnitudes, n_keep, sorted=False).values.min())


def trim(tau: Tensor, k: float = 0.2, threshold: float | None = None) -> Tensor:
    """Keep tau where |tau| >= t, zero elsewhere; t is this tensor's kept_count(k, numel)-th largest |tau|
    unless a global `threshold` is given. Entries tied with t are all kept."""
    _check_fraction(k)
    if threshold is None:
        threshold = magnitude_threshold([tau], k)
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def elect_sign(trimmed: Tensor) -> Tensor:
    """gamma = sgn(sum_t trimmed_t): the sign carrying more total mass wins (0 where it cancels)."""
    return torch.sign(trimmed.sum(dim=0))


def disjoint_mean(trimmed: Tensor, sign: Tensor) -> Tensor:
    """Mean over the tasks whose entry is non-zero and has sign gamma; 0 where none does."""
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    total = (trimmed * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1)


def ties(taus: Tensor, k: float = 0.2, alpha: float = 1.0, thresholds: Iterable[float] | None = None) -> Tensor:
    """tau_star = alpha * disjoint_mean(trim_k(tau_t), sgn(sum_t trim_k(tau_t))).

    Trims per tensor, or at `thresholds[t]`, task t's `magnitude_threshold` over its whole model.
    """
    thresholds = [None] * len(taus) if thresholds is None else list(thresholds)
    if len(thresholds) != len(taus):
        raise ValueError(f"got {len(thresholds)} trim thresholds for {len(taus)} tasks")
    trimmed = torch.stack([trim(tau, k, threshold) for tau, threshold in zip(taus, thresholds, strict=True)])
    return alpha * disjoint_mean(trimmed, elect_sign(trimmed))


# ---- other merges ---------------------------------------------------------------------------


def task_arithmetic(taus: Tensor, alpha: float = 1.0) -> Tensor:
    """tau_star = alpha * sum_t tau_t."""
    return alpha * taus.sum(dim=0)


def uniform(seed: int, key: str, start: int, stop: int) -> Tensor:
    """U[0, 1) draws for flat entries [start, stop) of the stream named `key`, float32 [stop - start].

    A counter-based generator (splitmix64 of a hash of (seed, key) plus the entry's index): a draw depends
    only on the entry, so a tensor read in chunks of any size, in any order, gets the same draws.
    """
    offset = int.from_bytes(hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest(), "little")
    with np.errstate(over="ignore"):
        z = (np.arange(start, stop, dtype=np.uint64) + np.uint64(offset)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return torch.from_numpy((z >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24))


def dare(taus: Tensor, p: float, draws: Tensor) -> Tensor:
    """Drop each entry with probability p and rescale the rest: tau_t * 1[u >= p] / (1 - p), u ~ U[0, 1)
    given as `draws` (taus' shape). Merge the result with `task_arithmetic` or `ties`."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop probability p must lie in [0, 1), got {p}")
    return taus * (draws >= p) / (1.0 - p)


def tall_masks(taus: Tensor, tau_mtl: Tensor, lam: float | Iterable[float] = 1.0) -> Tensor:
    """TALL masks m_t = 1[|tau_t| > lam * |tau_mtl - tau_t|] on a task-arithmetic vector tau_mtl; strict, as
    in the paper (Wang et al. 2024), so an entry where tau_t = 0 is never in t's mask."""
    return taus.abs() > _per_task(lam, taus) * (tau_mtl - taus).abs()


def emr_elect(taus: Tensor) -> Tensor:
    """EMR's unified vector: gamma = +1 where sum_t tau_t > 0, else -1 (as the original code elects a zero
    sum); tau_uni = gamma * max over {t: sgn tau_t = gamma} of |tau_t| (0 where no task agrees)."""
    sign = torch.where(taus.sum(dim=0) > 0, 1.0, -1.0).to(taus.dtype)
    agree = torch.sign(taus) == sign
    return sign * (taus.abs() * agree).amax(dim=0)


def emr_masks(taus: Tensor, tau_uni: Tensor) -> Tensor:
    """EMR's task masks m_t = 1[sgn(tau_t) = sgn(tau_uni) != 0] (sign agreement; a product would underflow)."""
    return torch.sign(taus) * torch.sign(tau_uni) > 0


def emr_rescalers(abs_sums: Tensor, masked_sums: Tensor) -> Tensor:
    """EMR's rescalers lambda_t = abs_sums_t / masked_sums_t; the original code sums per-tensor means over
    the model's parameters p: sum_p mean|tau_t[p]| / sum_p mean|m_t * tau_uni[p]|. 1 for a task whose mask
    is empty (it multiplies nothing, and an infinite one would make 0 * inf = NaN)."""
    return torch.where(masked_sums > 0, abs_sums / masked_sums.where(masked_sums > 0, 1.0), 1.0)


def magmax(taus: Tensor) -> Tensor:
    """MagMax: per entry, the tau_t of largest magnitude; the later task wins a tie, as the authors' fold
    tau_max = where(|tau_t| >= |tau_max|, tau_t, tau_max) in task order does."""
    best = taus[0]
    for tau in taus[1:]:
        best = torch.where(tau.abs() >= best.abs(), tau, best)
    return best.clone() if len(taus) == 1 else best


def disjoint_sum(trimmed: Tensor, sign: Tensor) -> Tensor:
    """Sum over the tasks whose entry is non-zero and has sign gamma (TIES's `sum` merge)."""
    return (trimmed * ((torch.sign(trimmed) == sign) & (trimmed != 0))).sum(dim=0)


def trim_rows(taus: Tensor, thresholds) -> Tensor:
    """Each row tau_t kept where |tau_t| >= thresholds[t], zero elsewhere."""
    limits = torch.as_tensor(list(thresholds), dtype=taus.dtype).reshape(-1, *([1] * (taus.dim() - 1)))
    return torch.where(taus.abs() >= limits, taus, torch.zeros((), dtype=taus.dtype))


def opcm_project(merged: Tensor, tau: Tensor, energy: float = 0.5) -> Tensor:
    """OPCM (Tang et al., NeurIPS 2025) for one weight matrix: tau minus its components along the merged
    vector's singular directions. With merged = U diag(s) V^T (full SVD) and P = U^T tau V, zero P's
    diagonal and its top-left r x r block, r = the first index where cumsum(s) / sum(s) > energy (0 if
    none), and return U P V^T. Computed in float64, returned in float32."""
    u, s, vh = torch.linalg.svd(merged.double(), full_matrices=True)
    share = s.cumsum(0) / s.sum()
    above = (share > energy).nonzero()
    rank = int(above[0]) if len(above) and bool(s.sum() > 0) else 0
    projected = u.T @ tau.double() @ vh.T
    projected.diagonal().fill_(0)
    projected[:rank, :rank] = 0
    return (u @ projected @ vh).float()


# ---- MMER: the decoupling masks -------------------------------------------------------------


def mmer_mask(tau_i: Tensor, tau_star: Tensor, lam: float = 1.0) -> Tensor:
    """m_i = 1[|tau_i| >= lam * |tau_i - tau_star|]; lam = 1 minimises ||theta_i - (theta0 + m * tau_star)||_1."""
    return tau_i.abs() >= lam * (tau_i - tau_star).abs()


def mmer(
    taus: Tensor,
    k: float = 0.2,
    alpha: float = 1.0,
    lam: float | Iterable[float] = 1.0,
    thresholds: Iterable[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """One MMER step on one parameter: tau_star = ties(taus), masks[t] = mmer_mask(tau_t, tau_star, lam_t)."""
    tau_star = ties(taus, k, alpha, thresholds)
    return tau_star, taus.abs() >= _per_task(lam, taus) * (taus - tau_star).abs()


def decouple(theta0: Tensor, mask: Tensor, tau_star: Tensor, scale: float = 1.0) -> Tensor:
    """theta_hat_i = theta0 + (m_i * tau_star) * r_i, summed in float32 (float64 for float64 weights), in
    theta0's dtype; r_i = 1 but for rescaling mask rules (EMR). A bfloat16 tau_star is widened to float32
    first: the same float32 product as a float32 one."""
    wide = torch.promote_types(theta0.dtype, torch.float32)
    delta = mask * tau_star.to(torch.promote_types(tau_star.dtype, torch.float32))
    return (theta0.to(wide) + (delta if scale == 1.0 else delta * torch.tensor(scale, dtype=delta.dtype))).to(theta0.dtype)


def _per_task(lam: float | Iterable[float], taus: Tensor) -> Tensor:
    """A scalar lam, or one per task, shaped [T, 1, ...] to broadcast over taus [T, *shape]."""
    lams = torch.as_tensor(lam if isinstance(lam, (int, float)) else list(lam), dtype=taus.dtype).flatten()
    if lams.numel() == 1:
        return lams.reshape(())
    if lams.numel() != len(taus):
        raise ValueError(f"got {lams.numel()} lam values for {len(taus)} tasks")
    return lams.reshape(-1, *([1] * (taus.dim() - 1)))


# ---- bit-packed masks -----------------------------------------------------------------------

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(mask: Tensor) -> Tensor:
    """A bool mask as flat uint8, 1 bit per entry, little-endian within a byte; pads the last byte with 0."""
    if mask.dtype != torch.bool:
        raise ValueError(f"pack_mask takes a bool tensor, got {mask.dtype}")
    flat = mask.flatten()
    padded = torch.zeros(math.ceil(flat.numel() / 8) * 8, dtype=torch.uint8)
    padded[: flat.numel()] = flat
    return (padded.view(-1, 8) * _BITS).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, shape: Iterable[int]) -> Tensor:
    """Inverse of pack_mask: the bool mask of the given shape."""
    shape = tuple(shape)
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(numel / 8):
        raise ValueError(
            f"a packed mask for shape {shape} is {math.ceil(numel / 8)} uint8 bytes; "
            f"got {packed.numel()} of {packed.dtype}"
        )
    bits = (packed.unsqueeze(1) & _BITS) != 0
    return bits.flatten()[:numel].reshape(shape)


# ---- registries: merges and mask rules over a chunk [T, n] of task vectors ---------------------


@dataclass(frozen=True)
class Merge:
    """A merge method: tau_star = fn(taus, **params) over one chunk of task vectors taus [T, n], float32.

    trim: fn also takes `thresholds`, each row's top-k magnitude threshold (per tensor, or over the model).
    drop: DARE first: the fold hands fn tau_t * 1[u >= p] / (1 - p) (thresholds are those of the dropped rows).
    needs: what a state must keep of an old task for the merge to be exact: "vectors" (tau_t: exact mode)
        or "trimmed" (trim_k(tau_t): sparse mode too). A compact state keeps neither and approximates an
        old tau_t by its decoupled delta (r_t * m_t * tau_star / alpha).
    running: a continual merge, folded into the running merged vector: taus is [tau_star_old, tau_new]
        ([tau_new] for the first task); it needs nothing of old tasks, and a refit replays it in order.
    elementwise: False for a merge that sees whole tensors in their shape and their `name` (OPCM's SVD).
    normalize: tau_star is scaled to mean_t ||tau_t|| / ||tau_star|| (global L2 norms; OPCM).
    params: the fold settings fn takes by keyword.
    """

    fn: Callable[..., Tensor]
    params: tuple[str, ...] = ("alpha",)
    trim: bool = False
    drop: bool = False
    needs: str = "vectors"
    running: bool = False
    elementwise: bool = True
    normalize: bool = False


@dataclass(frozen=True)
class MaskRule:
    """A mask rule: masks = fn(taus [T, n], tau_star [n], lams [T, 1]) -> bool [T, n]; task t's model is
    theta0 + r_t * m_t * tau_star. fn None: no masks, every task gets theta0 + tau_star.

    random: fn also takes `draws` [T, n] ~ U[0, 1) (merging.uniform, keyed by task and tensor).
    rescale: r_t = sum_p mean|tau_t[p]| / sum_p mean|m_t * tau_star[p]| over the model's tensors p (EMR's
        rescaler), else r_t = 1.
    """

    fn: Callable[..., Tensor] | None
    random: bool = False
    rescale: bool = False


MERGES: dict[str, Merge] = {}
MASK_RULES: dict[str, MaskRule] = {}


def register_merge(name: str, **declared):
    """Decorator: registers fn(taus, **params) -> tau_star as merge `name` (declared: Merge's fields)."""
    def register(fn):
        MERGES[name] = Merge(fn, **declared)
        return fn
    return register


def register_mask_rule(name: str, **declared):
    """Decorator: registers fn(taus, tau_star, lams) -> masks as mask rule `name` (declared: MaskRule's fields)."""
    def register(fn):
        MASK_RULES[name] = MaskRule(fn, **declared)
        return fn
    return register


@register_merge("ties", trim=True, needs="trimmed")
def _ties(taus, thresholds, alpha):
    """alpha * disjoint_mean(trim_k(tau), sgn(sum_t trim_k(tau_t)))."""
    trimmed = trim_rows(taus, thresholds)
    return alpha * disjoint_mean(trimmed, elect_sign(trimmed))


register_merge("dare_ties", trim=True, drop=True, params=("alpha",))(_ties)
register_merge("emr", params=())(emr_elect)
register_merge("magmax")(lambda taus, alpha: alpha * magmax(taus))


@register_merge("task_arithmetic", running=True)
def _task_arithmetic(taus, alpha):
    """tau_star_t = tau_star_{t-1} + alpha * tau_t = alpha * sum_t tau_t: Task Arithmetic is its own
    continual form (FusionBench's continual Task Arithmetic), so it needs nothing of old tasks."""
    return alpha * taus[-1] + (taus[0] if len(taus) == 2 else 0.0)


@register_merge("continual_ties", running=True, trim=True)
def _continual_ties(taus, thresholds, alpha):
    """tau_star_1 = alpha * tau_1; tau_star_t = tau_star_{t-1} + alpha * disjoint_sum(trim_k([tau_star_{t-1};
    tau_t])), the running vector counted as a task, as FusionBench's continual TIES does."""
    if len(taus) == 1:
        return alpha * taus[0]
    trimmed = trim_rows(taus, thresholds)
    return taus[0] + alpha * disjoint_sum(trimmed, elect_sign(trimmed))


@register_merge("opcm", running=True, elementwise=False, normalize=True, params=("energy",))
def _opcm(taus, name, energy):
    """S_1 = tau_1; S_t = S_{t-1} + opcm_project(S_{t-1}, tau_t) for weight matrices (2-D, not an
    embedding), S_{t-1} + tau_t for every other tensor; tau_star = S_t scaled by `normalize`."""
    if len(taus) == 1:
        return taus[0].clone()
    merged, tau = taus
    if merged.dim() == 2 and "embed" not in name:
        return merged + opcm_project(merged, tau, energy)
    return merged + tau


register_mask_rule("mmer")(lambda taus, tau_star, lams: taus.abs() >= lams * (taus - tau_star).abs())
register_mask_rule("tall")(lambda taus, tau_star, lams: taus.abs() > lams * (tau_star - taus).abs())
register_mask_rule("emr", rescale=True)(lambda taus, tau_star, lams: emr_masks(taus, tau_star))
register_mask_rule("sign")(lambda taus, tau_star, lams: emr_masks(taus, tau_star))
# a random mask of density lam where tau_star != 0 (ones elsewhere, as MMER's mask with lam <= 1 is there)
register_mask_rule("random", random=True)(lambda taus, tau_star, lams, draws: (draws < lams) | (tau_star == 0))
MASK_RULES["none"] = MaskRule(None)


# ---- whole models -----------------------------------------------------------------------------


def merge_state_dicts(task_vectors_by_task: list[StateDict], method: Callable[..., Tensor], **kwargs) -> dict:
    """Apply a per-parameter method to every parameter: out[n] = method(stack_t tau_t[n], **kwargs).

    All task vectors must cover the same parameters with the same shapes.
    """
    if not task_vectors_by_task:
        raise ValueError("no task vectors to merge: the task list is empty")
    names = list(task_vectors_by_task[0])
    for index, taus in enumerate(task_vectors_by_task[1:], start=1):
        if set(taus) != set(names):
            missing = sorted(set(names) - set(taus))[:5]
            extra = sorted(set(taus) - set(names))[:5]
            raise ValueError(f"task {index}'s vector differs from task 0's: missing {missing}, extra {extra}")
    merged = {}
    for name in names:
        shapes = {tuple(taus[name].shape) for taus in task_vectors_by_task}
        if len(shapes) > 1:
            raise ValueError(f"tensor '{name}' has different shapes across tasks: {sorted(shapes)}")
        merged[name] = method(torch.stack([taus[name].float() for taus in task_vectors_by_task]), **kwargs)
    return merged
