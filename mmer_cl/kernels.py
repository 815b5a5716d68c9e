"""Fused loops for the paths that touch every parameter: a fold's task vectors, trim thresholds and
TIES + masks, and a task switch's decouple. Each does in one pass over memory, on every core, what the
torch expressions in merging.py do in several passes. They repeat those expressions' float32 operations
in the same order (torch sums over tasks sequentially from +0.0, casts alpha to float32, rounds float32
to bfloat16 to nearest even), so their results are bit-identical: tests/test_kernels.py checks each
against merging.py. Compiled by numba on first use and cached beside this file.

Entry points take and return torch tensors; dtypes or layouts a kernel does not cover go through the
merging.py expression it replaces.
"""

import math

import numba
import numpy as np
import torch
from torch import Tensor

from mmer_cl import merging

# Fold workers call kernels from several threads at once: only the TBB and OpenMP layers allow that.
numba.config.THREADING_LAYER = "threadsafe"
BLOCK = 1 << 14  # entries per parallel work item: a multiple of 8 (one mask byte), small enough for L2
_PACK = np.uint64(0x0102040810204080)  # (8 bytes of 0/1 as a little-endian word * _PACK) >> 56 = those 8 bits
_EXPONENT = np.uint32(0x7F800000)


def _bits(tensor: Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous CPU tensor's memory, bfloat16 as uint16."""
    flat = tensor.detach().reshape(-1)
    return (flat.view(torch.uint16) if flat.dtype == torch.bfloat16 else flat).numpy()


def _fusable(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


# ---- task vectors ----------------------------------------------------------------------------------


@numba.njit(parallel=True, nogil=True, cache=True)
def _delta_bf16(out, finetuned, base):
    """out = float32(finetuned) - float32(base) over bfloat16 bits; False if an input is NaN or Inf."""
    n = out.size
    bad = 0
    for block in numba.prange((n + BLOCK - 1) // BLOCK):
        lo = block * BLOCK
        hi = min(lo + BLOCK, n)
        mine, theirs, o = finetuned[lo:hi], base[lo:hi], out[lo:hi]
        a = np.empty(hi - lo, np.uint32)
        b = np.empty(hi - lo, np.uint32)
        exponent = np.uint32(0)  # the largest exponent field seen: all ones only for NaN and Inf
        for i in range(hi - lo):
            a[i] = np.uint32(mine[i]) << 16
            b[i] = np.uint32(theirs[i]) << 16
            exponent = max(exponent, a[i] & _EXPONENT, b[i] & _EXPONENT)
        fa = a.view(np.float32)
        fb = b.view(np.float32)
        for i in range(hi - lo):
            o[i] = fa[i] - fb[i]
        bad += exponent == _EXPONENT
    return bad == 0


@numba.njit(parallel=True, nogil=True, cache=True)
def _delta_float(out, finetuned, base):
    """float32 or float64 weights: subtract in their precision, round to float32 once; False if an input
    is NaN or Inf (their difference then is too)."""
    n = out.size
    bad = 0
    for block in numba.prange((n + BLOCK - 1) // BLOCK):
        lo = block * BLOCK
        hi = min(lo + BLOCK, n)
        mine, theirs, o = finetuned[lo:hi], base[lo:hi], out[lo:hi]
        total = 0.0
        for i in range(hi - lo):
            delta = mine[i] - theirs[i]
            o[i] = np.float32(delta)
            total += delta * 0.0  # NaN iff some delta is NaN or Inf
        bad += total != 0.0
    return bad == 0


def task_vector(base: Tensor, finetuned: Tensor, name: str = "tensor", out: Tensor | None = None) -> Tensor:
    """merging.task_vector (same checks and messages), in one pass for bfloat16, float32 and float64;
    into `out` (float32, contiguous, as many elements) if given."""
    if (base.shape != finetuned.shape or base.dtype != finetuned.dtype or not _fusable(base, finetuned)
            or base.dtype not in (torch.bfloat16, torch.float32, torch.float64)):
        tau = merging.task_vector(base, finetuned, name)
        return tau if out is None else out.copy_(tau.reshape(out.shape))
    if out is None:
        out = torch.empty(base.shape, dtype=torch.float32)
    elif out.dtype != torch.float32 or out.numel() != base.numel() or not _fusable(out):
        raise ValueError(f"tensor '{name}': the task vector of {base.numel()} entries needs a contiguous float32 "
                         f"output of as many, got {out.numel()} {out.dtype}")
    kernel = _delta_bf16 if base.dtype == torch.bfloat16 else _delta_float
    if not kernel(_bits(out), _bits(finetuned), _bits(base)):
        merging.task_vector(base, finetuned, name)  # raises, naming the tensor and the model
    return out


# ---- exact k-th largest magnitude: histograms of float32 bits --------------------------------------


@numba.njit(parallel=True, nogil=True, cache=True)
def _histogram(bits, bucket, low_half, parts):
    """Counts of the high 15 bits of |x|, or (low_half) of the low 16 bits of the |x| in that bucket."""
    n = bits.size
    size = 1 << 16 if low_half else 1 << 15
    local = np.zeros((parts, size), np.int64)
    step = (n + parts - 1) // parts
    for part in numba.prange(parts):
        counts, mine = local[part], bits[part * step:(part + 1) * step]
        for i in range(mine.size):
            magnitude = mine[i] & 0x7FFFFFFF
            if not low_half:
                counts[magnitude >> 16] += 1
            elif magnitude >> 16 == bucket:
                counts[magnitude & 0xFFFF] += 1
    return local.sum(axis=0)


def magnitude_histogram(chunk: Tensor, bucket: int | None = None) -> Tensor:
    """The histogram kth_largest_magnitude needs of a float32 chunk: |x|'s high 16 bits (15 of them, the
    sign cleared), or, given a high-bits bucket, the low 16 bits of the entries in it."""
    flat = chunk.detach().reshape(-1).contiguous().float()
    low = bucket is not None
    return torch.from_numpy(_histogram(flat.view(torch.int32).numpy(), -1 if bucket is None else bucket, low,
                                       numba.get_num_threads()))


def kth_largest_magnitude(chunks, n_keep: int) -> float:
    """The n_keep-th largest |x| over all chunks (an iterable factory, called twice): the value
    merging.magnitude_threshold gives, in O(chunk) memory and much faster than its top-k: |x| as
    float32 bits orders like its value, so a histogram of the high 16 bits finds the bucket, a second
    of the low 16 bits the value."""
    if n_keep <= 0:
        return math.inf
    high = torch.zeros(1 << 15, dtype=torch.int64)
    for chunk in chunks():
        high += magnitude_histogram(chunk)
    above = high.flip(0).cumsum(0).flip(0)  # above[b] = entries in buckets >= b
    bucket = int((above >= n_keep).nonzero().max())
    rest = n_keep - (int(above[bucket + 1]) if bucket + 1 < len(above) else 0)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for chunk in chunks():
        low += magnitude_histogram(chunk, bucket)
    value = int((low.flip(0).cumsum(0).flip(0) >= rest).nonzero().max())
    return float(torch.tensor([(bucket << 16) | value], dtype=torch.int32).view(torch.float32))


# ---- TIES + MMER masks ----------------------------------------------------------------------------


@numba.njit(parallel=True, nogil=True, cache=True)
def _mmer(taus, thresholds, alpha, lams, tau_star, packed):
    """merging.mmer over [T, n] float32 taus with per-task thresholds: tau_star [n], masks packed [T, n/8].
    Loops run over a block's entries innermost, so that they vectorise."""
    n_tasks, n = taus.shape
    for block in numba.prange((n + BLOCK - 1) // BLOCK):
        lo = block * BLOCK
        hi = min(lo + BLOCK, n)
        total = np.zeros(hi - lo, np.float32)
        for t in range(n_tasks):
            row, threshold = taus[t, lo:hi], thresholds[t]
            for i in range(hi - lo):
                total[i] += row[i] if abs(row[i]) >= threshold else np.float32(0.0)
        sign = np.sign(total)
        kept = np.zeros(hi - lo, np.float32)
        count = np.zeros(hi - lo, np.float32)
        for t in range(n_tasks):
            row, threshold = taus[t, lo:hi], thresholds[t]
            for i in range(hi - lo):
                trimmed = row[i] if abs(row[i]) >= threshold else np.float32(0.0)
                agree = np.float32(trimmed * sign[i] > 0)  # sgn(trimmed) = sign != 0
                kept[i] += trimmed * agree
                count[i] += agree
        merged = tau_star[lo:hi]
        for i in range(hi - lo):
            merged[i] = alpha * (kept[i] / max(count[i], np.float32(1.0)))
        flags = np.zeros((hi - lo + 7) // 8 * 8, np.uint8)  # one byte per entry, 0 past hi
        words = flags.view(np.uint64)
        for t in range(n_tasks):
            row, lam, out = taus[t, lo:hi], lams[t], packed[t, lo >> 3:]
            for i in range(hi - lo):
                flags[i] = abs(row[i]) >= lam * abs(row[i] - merged[i])
            for j in range(words.size):  # 8 flag bytes -> 8 bits, the first entry lowest
                out[j] = np.uint8((words[j] * _PACK) >> np.uint64(56))


def mmer_packed(taus: Tensor, alpha: float, lams: list[float], thresholds: list[float]) -> tuple[Tensor, Tensor]:
    """merging.mmer(taus [T, n], k, alpha, lams, thresholds) with the masks bit-packed ([T, ceil(n/8)]
    uint8, merging.pack_mask's layout): trimmed at the given per-task thresholds."""
    taus = taus.detach().float().contiguous()
    n_tasks, n = taus.shape
    if len(thresholds) != n_tasks or len(lams) != n_tasks:
        raise ValueError(f"{n_tasks} task vectors, {len(thresholds)} thresholds, {len(lams)} lam values")
    tau_star = torch.empty(n, dtype=torch.float32)
    packed = torch.empty((n_tasks, math.ceil(n / 8)), dtype=torch.uint8)
    _mmer(taus.numpy(), np.array(thresholds, np.float32), np.float32(alpha), np.array(lams, np.float32),
          tau_star.numpy(), packed.numpy())
    return tau_star, packed


# Fused paths for (merge, mask rule) pairs of merging's registries, keyed by their functions so that a
# re-registered method never runs on a kernel written for another: (taus, thresholds, params, lams) ->
# (tau_star [n], masks packed [T, ceil(n/8)]).
FUSED = {
    (merging.MERGES["ties"].fn, merging.MASK_RULES["mmer"].fn):
        lambda taus, thresholds, params, lams: mmer_packed(taus, params["alpha"], lams, thresholds),
}


# ---- decouple: theta0 + m * tau_star, written in place -------------------------------------------
# Each parallel block walks its entries in chunks of CHUNK, so that a bfloat16 chunk's float32 scratch stays
# in L1. tau_star is float32, or bfloat16 beside bfloat16 weights (a state folded with tau_dtype="weights"),
# widened exactly to float32 first: the same float32 operations either way.

CHUNK = 2048


@numba.njit(nogil=True, cache=True, inline="always")
def _span_bf16(o, weights, ta, bytes_, scale, bits):
    """bfloat16 as uint16 bits: bf16 -> f32 is a shift, f32 -> bf16 rounds to nearest even (NaN -> 0x7FC0).
    bits: uint32 scratch of at least the span's length. Mask bits by shifts of their byte, not a lookup
    table: the loop then vectorises."""
    m = o.size
    for i in range(m):
        bits[i] = np.uint32(weights[i]) << 16
    value = bits.view(np.float32)
    for j in range(m // 8):
        byte = np.uint32(bytes_[j])
        for k in range(8):
            value[8 * j + k] += np.float32((byte >> np.uint32(k)) & np.uint32(1)) * ta[8 * j + k] * scale
    for i in range(m // 8 * 8, m):
        value[i] += np.float32((np.uint32(bytes_[i >> 3]) >> np.uint32(i & 7)) & np.uint32(1)) * ta[i] * scale
    for i in range(m):
        b = bits[i]
        rounded = (b + np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1))) >> 16
        o[i] = np.uint16(0x7FC0) if (b & np.uint32(0x7FFFFFFF)) > _EXPONENT else np.uint16(rounded)


@numba.njit(parallel=True, nogil=True, cache=True)
def _decouple_bf16(out, theta0, tau_star, packed, scale):
    n = out.size
    for block in numba.prange((n + BLOCK - 1) // BLOCK):
        bits = np.empty(CHUNK, np.uint32)
        for lo in range(block * BLOCK, min(block * BLOCK + BLOCK, n), CHUNK):
            hi = min(lo + CHUNK, n)
            _span_bf16(out[lo:hi], theta0[lo:hi], tau_star[lo:hi], packed[lo >> 3:], scale, bits)


@numba.njit(parallel=True, nogil=True, cache=True)
def _decouple_bf16_half_tau(out, theta0, tau_star, packed, scale):
    """_decouple_bf16 with tau_star as bfloat16 bits, widened chunk by chunk."""
    n = out.size
    for block in numba.prange((n + BLOCK - 1) // BLOCK):
        bits = np.empty(CHUNK, np.uint32)
        wide = np.empty(CHUNK, np.uint32)
        ta = wide.view(np.float32)
        for lo in range(block * BLOCK, min(block * BLOCK + BLOCK, n), CHUNK):
            hi = min(lo + CHUNK, n)
            half = tau_star[lo:hi]  # slices and whole scratch arrays: contiguous to numba, so the loops vectorise
            for i in range(hi - lo):
                wide[i] = np.uint32(half[i]) << 16
            _span_bf16(out[lo:hi], theta0[lo:hi], ta, packed[lo >> 3:], scale, bits)


@numba.njit(parallel=True, nogil=True, cache=True)
def _decouple_float(out, theta0, tau_star, packed, scale):
    """float32 or float64 weights; (m * tau_star) * scale is a float32 product, as torch computes it."""
    n = out.size
    for block in numba.prange((n + BLOCK - 1) // BLOCK):
        lo = block * BLOCK
        hi = min(lo + BLOCK, n)
        o, weights, ta, bytes_ = out[lo:hi], theta0[lo:hi], tau_star[lo:hi], packed[lo >> 3:]
        for j in range((hi - lo) // 8):
            byte = np.uint32(bytes_[j])
            for k in range(8):
                i = 8 * j + k
                o[i] = weights[i] + np.float32((byte >> np.uint32(k)) & np.uint32(1)) * ta[i] * scale
        for i in range((hi - lo) // 8 * 8, hi - lo):
            o[i] = weights[i] + np.float32((np.uint32(bytes_[i >> 3]) >> np.uint32(i & 7)) & np.uint32(1)) * ta[i] * scale


def _kernel(out: Tensor, theta0: Tensor, tau_star: Tensor, packed: Tensor):
    """The kernel for these dtypes and layouts, or None."""
    if theta0.dtype != out.dtype or not _fusable(out, theta0, tau_star, packed):
        return None
    if out.dtype == torch.bfloat16:
        return {torch.float32: _decouple_bf16, torch.bfloat16: _decouple_bf16_half_tau}.get(tau_star.dtype)
    return _decouple_float if out.dtype in (torch.float32, torch.float64) and tau_star.dtype == torch.float32 else None


def decouple_into(out: Tensor, theta0: Tensor, tau_star: Tensor, packed: Tensor | None, scale: float = 1.0) -> None:
    """out <- merging.decouple(theta0, unpack_mask(packed), tau_star, scale), bit for bit, with no temporaries;
    packed None is the all-ones mask (theta0 + scale * tau_star)."""
    n = out.numel()
    if packed is None:
        packed = torch.full((math.ceil(n / 8),), 255, dtype=torch.uint8)
    if theta0.numel() != n or tau_star.numel() != n or packed.numel() != math.ceil(n / 8):
        raise ValueError(f"decouple_into: {n} weights, {theta0.numel()} in theta0, {tau_star.numel()} in tau_star, "
                         f"{packed.numel()} mask bytes (want {math.ceil(n / 8)})")
    kernel = _kernel(out, theta0, tau_star, packed)
    if kernel is None:
        mask = merging.unpack_mask(packed, out.shape)
        out.copy_(merging.decouple(theta0.reshape(out.shape), mask, tau_star.reshape(out.shape), scale))
        return
    kernel(_bits(out), _bits(theta0), _bits(tau_star), packed.numpy(), np.float32(scale))
