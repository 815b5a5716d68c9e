"""The merge algebra against loop-level transcriptions of its formulas, and against PEFT's TIES.

Each reference below walks the entries one by one in Python floats and rounds to the tensor's dtype exactly
where torch does (`rounding(dtype)`), so the comparisons are exact. Methods whose result depends on the order
of a sum (sign election, means) are drawn from grids (small integers, eighths) where every sum is exact.
"""

import itertools
import math
import struct
import warnings
from fractions import Fraction

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils as peft_merge

from mmer_cl import merging as M

PROPERTY = settings(max_examples=80, deadline=None, database=None)
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


# ---- rounding as torch does it ----------------------------------------------------------------


def f32(x: float) -> float:
    """x rounded to the nearest float32 (struct packs with round-to-nearest-even)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def bf16(x: float) -> float:
    """A float32 value rounded to the nearest bfloat16, ties to even, as torch's .to(bfloat16) does."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def rounding(dtype):
    return {F32: f32, F64: lambda x: x}[dtype]


def sgn(x: float) -> float:
    return 1.0 if x > 0 else -1.0 if x < 0 else 0.0


# ---- strategies -------------------------------------------------------------------------------

SHAPES = st.sampled_from([(), (1,), (1, 1), (7,), (2, 3), (3, 1, 2), (4, 4), (2, 2, 3)])
# Grids where every sum of <= 4 entries is exact: ties in magnitude, eighths, all negative, mostly zero.
GRIDS = {
    "ties": st.sampled_from([-2.0, -1.0, 0.0, 1.0, 2.0]),
    "eighths": st.integers(-40, 40).map(lambda i: i / 8),
    "negative": st.integers(-40, -1).map(lambda i: i / 8),
    "zeros": st.sampled_from([0.0, 0.0, 0.0, 0.0, 0.5, -1.5]),
}
# Any finite value, tiny and subnormal ones included: for methods that never add entries together.
FLOATS = {
    F32: st.floats(-1e3, 1e3, width=32),
    F64: st.floats(-1e3, 1e3),
    BF16: st.floats(-1e3, 1e3, width=32),
}
ALPHAS = st.sampled_from([0.5, 1.0, 1.5, 2.0, 0.3])
LAMS = st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 0.3])
KS = st.one_of(st.sampled_from([0.0, 0.2, 0.5, 1.0]), st.floats(0.0, 1.0))


@st.composite
def entries(draw, n: int, dtype, exact: bool) -> list[float]:
    """n values exactly representable in dtype, from one grid (exact) or from any finite floats."""
    elements = GRIDS[draw(st.sampled_from(sorted(GRIDS)))] if exact else FLOATS[dtype]
    values = draw(st.lists(elements, min_size=n, max_size=n))
    return torch.tensor(values, dtype=dtype).tolist()


@st.composite
def stacked(draw, dtypes=(F32, F64), exact=True, max_tasks=4):
    """Task vectors of one parameter stacked as [T, *shape]."""
    shape, tasks, dtype = draw(SHAPES), draw(st.integers(1, max_tasks)), draw(st.sampled_from(dtypes))
    values = draw(entries(tasks * math.prod(shape), dtype, exact))
    return torch.tensor(values, dtype=dtype).reshape(tasks, *shape)


@st.composite
def pair(draw, dtypes=(F32, F64), exact=False):
    """Two tensors of one shape and dtype."""
    shape, dtype = draw(SHAPES), draw(st.sampled_from(dtypes))
    n = math.prod(shape)
    return tuple(torch.tensor(draw(entries(n, dtype, exact)), dtype=dtype).reshape(shape) for _ in range(2))


def like(data, tensor: torch.Tensor, exact: bool) -> torch.Tensor:
    """Another tensor of tensor's shape and dtype."""
    values = data.draw(entries(tensor.numel(), tensor.dtype, exact))
    return torch.tensor(values, dtype=tensor.dtype).reshape(tensor.shape)


def rows(taus: torch.Tensor) -> list[list[float]]:
    """[T, *shape] -> T flat lists of Python floats."""
    return [tau.flatten().tolist() for tau in taus]


def assert_entries(actual: torch.Tensor, expected: list, shape, dtype) -> None:
    assert actual.dtype == dtype
    assert tuple(actual.shape) == tuple(shape)
    assert actual.flatten().tolist() == expected


# ---- loop-level transcriptions ------------------------------------------------------------------


def ref_threshold(flat_tensors: list[list[float]], k: float) -> float:
    """The ceil(k * N)-th largest magnitude; a k * N within float error of an integer is that integer
    (0.07 * 100 is 7.000000000000001 in floats, and means 7)."""
    magnitudes = sorted((abs(v) for values in flat_tensors for v in values), reverse=True)
    wanted = k * len(magnitudes)
    near = round(wanted)
    n_keep = near if near >= 1 and abs(wanted - near) <= 1e-9 * wanted else math.ceil(wanted)
    return math.inf if n_keep == 0 else magnitudes[n_keep - 1]


def ref_trim(tau: list[float], k: float, threshold: float | None = None) -> list[float]:
    threshold = ref_threshold([tau], k) if threshold is None else threshold
    return [v if abs(v) >= threshold else 0.0 for v in tau]


def ref_elect_sign(trimmed: list[list[float]]) -> list[float]:
    signs = []
    for j in range(len(trimmed[0])):
        total = 0.0
        for t in range(len(trimmed)):
            total += trimmed[t][j]
        signs.append(sgn(total))
    return signs


def ref_disjoint_mean(trimmed: list[list[float]], sign: list[float], rd) -> list[float]:
    means = []
    for j in range(len(sign)):
        total, count = 0.0, 0
        for t in range(len(trimmed)):
            if trimmed[t][j] != 0 and sgn(trimmed[t][j]) == sign[j]:
                total += trimmed[t][j]
                count += 1
        means.append(rd(total / count) if count else 0.0)
    return means


def ref_ties(taus: list[list[float]], k: float, alpha: float, rd, thresholds=None) -> list[float]:
    thresholds = [None] * len(taus) if thresholds is None else thresholds
    trimmed = [ref_trim(tau, k, threshold) for tau, threshold in zip(taus, thresholds)]
    mean = ref_disjoint_mean(trimmed, ref_elect_sign(trimmed), rd)
    return [rd(rd(alpha) * m) for m in mean]


def ref_mask(tau: list[float], other: list[float], lam: float, rd, strict: bool = False) -> list[bool]:
    """1[|tau| >= lam * |other - tau|] (MMER with other = tau_star), or with > (TALL with other = tau_mtl)."""
    return [abs(a) > rd(rd(lam) * abs(rd(b - a))) if strict else abs(a) >= rd(rd(lam) * abs(rd(b - a)))
            for a, b in zip(tau, other)]


def per_task(lam, tasks: int) -> list[float]:
    return [lam] * tasks if isinstance(lam, float) else lam


# ---- task vectors -------------------------------------------------------------------------------


@PROPERTY
@given(data=st.data())
def test_task_vector_is_the_float32_difference(data):
    base, finetuned = data.draw(pair(dtypes=(F32, F64, BF16)))
    tau = M.task_vector(base, finetuned, "w")
    expected = [f32(b - a) for a, b in zip(base.flatten().tolist(), finetuned.flatten().tolist())]
    assert_entries(tau, expected, base.shape, F32)


def test_task_vector_keeps_a_float64_delta_that_float32_weights_would_round_away():
    """tau = theta_i - theta0 in float32: subtracting first keeps 1e-12, casting first loses it."""
    base = torch.tensor([1.0], dtype=F64)
    tau = M.task_vector(base, base + 1e-12, "w")
    assert tau.item() == f32((1.0 + 1e-12) - 1.0) != 0.0


def test_task_vectors_split_shared_deltas_from_private_parameters():
    base = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    head = torch.tensor([[3.0, 4.0]])
    finetuned = {"w": torch.tensor([1.5, 1.0]), "b": torch.tensor([0.5]), "head.weight": head}
    shared, private = M.task_vectors(base, finetuned)
    assert set(shared) == {"w", "b"}
    assert shared["w"].tolist() == [0.5, -1.0] and shared["b"].tolist() == [0.0]
    assert set(private) == {"head.weight"} and torch.equal(private["head.weight"], head)


@PROPERTY
@given(
    rank=st.integers(1, 3),
    rows_out=st.integers(1, 4),
    cols_in=st.integers(1, 4),
    scaling=ALPHAS,
    fan_in_fan_out=st.booleans(),
    data=st.data(),
)
def test_lora_delta_is_scaling_times_b_a(rank, rows_out, cols_in, scaling, fan_in_fan_out, data):
    a = data.draw(entries(rank * cols_in, F32, exact=True))
    b = data.draw(entries(rows_out * rank, F32, exact=True))
    delta = M.lora_delta(
        torch.tensor(a).reshape(rank, cols_in), torch.tensor(b).reshape(rows_out, rank), scaling, fan_in_fan_out
    )
    product = [
        [sum(b[i * rank + r] * a[r * cols_in + j] for r in range(rank)) for j in range(cols_in)]
        for i in range(rows_out)
    ]
    expected = [[f32(f32(scaling) * product[i][j]) for j in range(cols_in)] for i in range(rows_out)]
    if fan_in_fan_out:
        expected = [list(column) for column in zip(*expected)]
    assert delta.dtype == F32 and delta.tolist() == expected


# ---- TIES ---------------------------------------------------------------------------------------


@PROPERTY
@given(data=st.data(), k=KS)
def test_trim_keeps_entries_at_or_above_the_ceil_k_n_th_largest_magnitude(data, k):
    taus = data.draw(stacked(exact=data.draw(st.booleans()), max_tasks=1))
    tau = taus[0]
    expected = ref_trim(tau.flatten().tolist(), k)
    assert_entries(M.trim(tau, k), expected, tau.shape, tau.dtype)


@PROPERTY
@given(data=st.data(), k=KS)
def test_magnitude_threshold_is_global_and_trim_applies_it(data, k):
    dtype = data.draw(st.sampled_from([F32, F64]))
    exact = data.draw(st.booleans())
    tensors = [data.draw(stacked(dtypes=(dtype,), exact=exact, max_tasks=1))[0] for _ in range(3)]
    flats = [t.flatten().tolist() for t in tensors]
    threshold = M.magnitude_threshold(tensors, k)
    assert threshold == ref_threshold(flats, k)
    for tensor, flat in zip(tensors, flats):
        assert_entries(M.trim(tensor, k, threshold=threshold), ref_trim(flat, k, threshold), tensor.shape, dtype)


def test_trim_keeps_the_decimal_fraction_not_one_more():
    """k = 0.07 of 100 entries keeps 7; 0.07 * 100 == 7.000000000000001 in floats, whose ceil is 8."""
    tau = torch.arange(1.0, 101.0)
    assert int((M.trim(tau, 0.07) != 0).sum()) == 7


def test_trim_keeps_every_float64_entry_with_k_1():
    """A float64 threshold rounded to float32 (0.1 -> 0.10000000149) would drop the entry equal to it."""
    tau = torch.tensor([0.1, 0.3], dtype=F64)
    assert torch.equal(M.trim(tau, 1.0), tau)


@PROPERTY
@given(data=st.data())
def test_elect_sign_and_disjoint_mean(data):
    trimmed = data.draw(stacked())
    rd = rounding(trimmed.dtype)
    shape = trimmed.shape[1:]
    sign = M.elect_sign(trimmed)
    expected_sign = ref_elect_sign(rows(trimmed))
    assert_entries(sign, expected_sign, shape, trimmed.dtype)
    assert_entries(M.disjoint_mean(trimmed, sign), ref_disjoint_mean(rows(trimmed), expected_sign, rd), shape, trimmed.dtype)


@PROPERTY
@given(data=st.data(), k=KS, alpha=ALPHAS)
def test_ties_per_tensor(data, k, alpha):
    taus = data.draw(stacked())
    expected = ref_ties(rows(taus), k, alpha, rounding(taus.dtype))
    assert_entries(M.ties(taus, k, alpha), expected, taus.shape[1:], taus.dtype)


@PROPERTY
@given(data=st.data(), k=KS, alpha=ALPHAS)
def test_ties_with_one_global_threshold_per_task(data, k, alpha):
    taus = data.draw(stacked())
    rest_of_model = [data.draw(stacked(dtypes=(taus.dtype,), max_tasks=1))[0] for _ in taus]
    thresholds = [M.magnitude_threshold([tau, rest], k) for tau, rest in zip(taus, rest_of_model)]
    assert thresholds == [
        ref_threshold([tau.flatten().tolist(), rest.flatten().tolist()], k) for tau, rest in zip(taus, rest_of_model)
    ]
    expected = ref_ties(rows(taus), k, alpha, rounding(taus.dtype), thresholds)
    assert_entries(M.ties(taus, k, alpha, thresholds=thresholds), expected, taus.shape[1:], taus.dtype)


# ---- other merges -------------------------------------------------------------------------------


@PROPERTY
@given(data=st.data(), alpha=ALPHAS)
def test_task_arithmetic(data, alpha):
    taus = data.draw(stacked())
    rd = rounding(taus.dtype)
    per_entry = list(zip(*rows(taus)))
    expected = []
    for column in per_entry:
        total = 0.0
        for v in column:
            total += v
        expected.append(rd(rd(alpha) * total))
    assert_entries(M.task_arithmetic(taus, alpha), expected, taus.shape[1:], taus.dtype)


@PROPERTY
@given(data=st.data(), p=st.one_of(st.just(0.0), st.floats(0.0, 0.95)), seed=st.integers(0, 2**32 - 1))
def test_dare_drops_or_rescales_each_entry_and_repeats_with_the_seed(data, p, seed):
    taus = data.draw(stacked(exact=False))
    draws = M.uniform(seed, "dare", 0, taus.numel()).reshape(taus.shape)
    out = M.dare(taus, p, draws)
    assert torch.equal(out, M.dare(taus, p, M.uniform(seed, "dare", 0, taus.numel()).reshape(taus.shape)))
    assert out.dtype == taus.dtype and out.shape == taus.shape
    relative, subnormal = (1e-6, 2.0**-148) if taus.dtype == F32 else (1e-15, 2.0**-1073)
    for tau, kept in zip(taus.flatten().tolist(), out.flatten().tolist()):
        rescaled = tau / (1.0 - p)
        assert kept == 0.0 or abs(kept - rescaled) <= relative * abs(rescaled) + subnormal
    if p == 0.0:
        assert torch.equal(out, taus)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dare_drops_a_fraction_near_p(p):
    taus = torch.ones(2, 50_000)
    out = M.dare(taus, p, M.uniform(0, "dare", 0, taus.numel()).reshape(taus.shape))
    dropped = float((out == 0).float().mean())
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / taus.numel())
    assert torch.allclose(out[out != 0], torch.tensor(1 / (1 - p)))
    assert not torch.equal(out, M.dare(taus, p, M.uniform(1, "dare", 0, taus.numel()).reshape(taus.shape)))


def test_uniform_draws_do_not_depend_on_how_a_tensor_is_chunked():
    whole = M.uniform(7, "dare/task/w", 0, 10_000)
    parts = torch.cat([M.uniform(7, "dare/task/w", a, min(a + 999, 10_000)) for a in range(0, 10_000, 999)])
    assert torch.equal(whole, parts) and 0.0 <= float(whole.min()) and float(whole.max()) < 1.0
    assert abs(float(whole.mean()) - 0.5) < 0.02 and not torch.equal(whole, M.uniform(7, "dare/other/w", 0, 10_000))


@PROPERTY
@given(data=st.data())
def test_tall_masks(data):
    taus = data.draw(stacked())
    tau_mtl = like(data, taus[0], exact=True)
    lam = data.draw(st.one_of(LAMS, st.lists(LAMS, min_size=len(taus), max_size=len(taus))))
    rd = rounding(taus.dtype)
    expected = [ref_mask(tau, tau_mtl.flatten().tolist(), lam_t, rd, strict=True)
                for tau, lam_t in zip(rows(taus), per_task(lam, len(taus)))]
    masks = M.tall_masks(taus, tau_mtl, lam)
    assert masks.dtype == torch.bool and masks.shape == taus.shape
    assert rows(masks) == expected


@PROPERTY
@given(data=st.data())
def test_emr_elect(data):
    taus = data.draw(stacked())
    expected = []
    for column in zip(*rows(taus)):
        total = 0.0
        for v in column:
            total += v
        sign = 1.0 if total > 0 else -1.0  # the original code elects -1 for a zero sum
        largest = 0.0
        for v in column:
            if sgn(v) == sign and abs(v) > largest:
                largest = abs(v)
        expected.append(sign * largest)
    assert_entries(M.emr_elect(taus), expected, taus.shape[1:], taus.dtype)


@PROPERTY
@given(data=st.data())
def test_emr_masks_are_sign_agreement(data):
    taus = data.draw(stacked(exact=data.draw(st.booleans())))
    tau_uni = M.emr_elect(taus) if data.draw(st.booleans()) else like(data, taus[0], exact=False)
    uni = tau_uni.flatten().tolist()
    expected = [[(v > 0 and u > 0) or (v < 0 and u < 0) for v, u in zip(tau, uni)] for tau in rows(taus)]
    masks = M.emr_masks(taus, tau_uni)
    assert masks.dtype == torch.bool and rows(masks) == expected


def test_emr_masks_agree_on_tiny_entries_of_one_sign():
    """1e-30 * 1e-30 underflows to 0 in float32; the signs still agree."""
    taus = torch.tensor([[1e-30], [2e-30]])
    assert M.emr_masks(taus, M.emr_elect(taus)).all()


@PROPERTY
@given(data=st.data())
def test_emr_rescalers_over_a_model(data):
    taus = data.draw(stacked(dtypes=(F32,)))
    tau_uni = M.emr_elect(taus)
    masks = M.emr_masks(taus, tau_uni)
    uni = tau_uni.flatten().tolist()
    abs_sums, masked_sums = [], []
    for tau, mask in zip(rows(taus), rows(masks)):
        abs_sums.append(sum(abs(v) for v in tau))
        masked_sums.append(sum(abs(u) for u, m in zip(uni, mask) if m))
    rescalers = M.emr_rescalers(torch.tensor(abs_sums), torch.tensor(masked_sums))
    for got, a, m in zip(rescalers.tolist(), abs_sums, masked_sums):
        if m > 0:
            assert got == f32(a / m)


def test_emr_rescaler_of_a_task_whose_mask_is_empty_is_finite():
    """lambda_t multiplies m_t * tau_uni = 0; an infinite lambda_t would turn the task's weights into NaN."""
    rescalers = M.emr_rescalers(torch.tensor([10.0, 2.0]), torch.tensor([0.0, 4.0]))
    assert torch.isfinite(rescalers).all()
    assert rescalers[1].item() == 0.5


@PROPERTY
@given(data=st.data())
def test_magmax_takes_the_largest_magnitude_later_task_on_ties(data):
    taus = data.draw(stacked(exact=data.draw(st.booleans())))
    expected = []
    for column in zip(*rows(taus)):
        best = column[0]
        for v in column[1:]:
            if abs(v) >= abs(best):
                best = v
        expected.append(best)
    assert_entries(M.magmax(taus), expected, taus.shape[1:], taus.dtype)


# ---- MMER ---------------------------------------------------------------------------------------


@PROPERTY
@given(data=st.data(), lam=st.one_of(LAMS, st.floats(0.0, 3.0)))
def test_mmer_mask(data, lam):
    tau_i, tau_star = data.draw(pair(exact=data.draw(st.booleans())))
    expected = ref_mask(tau_i.flatten().tolist(), tau_star.flatten().tolist(), lam, rounding(tau_i.dtype))
    assert_entries(M.mmer_mask(tau_i, tau_star, lam), expected, tau_i.shape, torch.bool)


@PROPERTY
@given(data=st.data(), low=LAMS, high=LAMS)
def test_a_smaller_lam_gives_a_larger_mask(data, low, high):
    low, high = sorted((low, high))
    tau_i, tau_star = data.draw(pair())
    assert (M.mmer_mask(tau_i, tau_star, high) <= M.mmer_mask(tau_i, tau_star, low)).all()


@PROPERTY
@given(data=st.data(), k=KS, alpha=ALPHAS, global_threshold=st.booleans())
def test_mmer_with_one_lam_per_task(data, k, alpha, global_threshold):
    taus = data.draw(stacked())
    lam = data.draw(st.one_of(LAMS, st.lists(LAMS, min_size=len(taus), max_size=len(taus))))
    thresholds = [M.magnitude_threshold([tau], k) for tau in taus] if global_threshold else None
    rd = rounding(taus.dtype)
    expected_star = ref_ties(rows(taus), k, alpha, rd, thresholds)
    tau_star, masks = M.mmer(taus, k, alpha, lam, thresholds)
    assert_entries(tau_star, expected_star, taus.shape[1:], taus.dtype)
    assert masks.dtype == torch.bool and masks.shape == taus.shape
    assert rows(masks) == [ref_mask(tau, expected_star, lam_t, rd) for tau, lam_t in zip(rows(taus), per_task(lam, len(taus)))]


def test_mmer_and_mmer_mask_agree_on_float64_with_a_lam_that_float32_rounds():
    """1 >= 0.1 * |1 - 11| holds in float64; float32(0.1) * 10 = 1.0000000149 would reject it."""
    taus = torch.tensor([[1.0]], dtype=F64)
    tau_star, masks = M.mmer(taus, k=1.0, alpha=11.0, lam=0.1)
    assert M.mmer_mask(taus[0], tau_star, 0.1).item() is True
    assert masks[0].item() is True
    # 1 > 0.09999999999 * |11 - 1| in float64; the float32 lam (0.1000000015) would reject it
    assert M.tall_masks(taus, torch.tensor([11.0], dtype=F64), 0.09999999999).item() is True


def l_distance(theta_i, theta0, tau_star, mask, power) -> Fraction:
    return sum(abs(Fraction(ti) - (Fraction(t0) + m * Fraction(s))) ** power
               for ti, t0, s, m in zip(theta_i, theta0, tau_star, mask))


@PROPERTY
@given(n=st.integers(1, 8), data=st.data())
def test_mmer_mask_with_lam_1_minimises_the_distance_over_all_masks(n, data):
    """||theta_i - (theta0 + m * tau_star)||_p over all 2^n masks; indifferent entries may go either way."""
    theta0, tau_i, tau_star = (data.draw(entries(n, F64, exact=True)) for _ in range(3))
    theta_i = [a + b for a, b in zip(theta0, tau_i)]  # exact on the grid
    mask = M.mmer_mask(torch.tensor(tau_i, dtype=F64), torch.tensor(tau_star, dtype=F64), 1.0).tolist()
    for power in (1, 2):
        best = min(l_distance(theta_i, theta0, tau_star, m, power) for m in itertools.product((0, 1), repeat=n))
        assert l_distance(theta_i, theta0, tau_star, mask, power) == best


@settings(max_examples=40, deadline=None, database=None)
@given(n=st.integers(1, 6), tasks=st.integers(1, 3), k=KS, alpha=ALPHAS, data=st.data())
def test_mmer_masks_minimise_each_tasks_l1_distance_to_its_model(n, tasks, k, alpha, data):
    theta0 = data.draw(entries(n, F32, exact=True))
    taus = torch.tensor([data.draw(entries(n, F32, exact=True)) for _ in range(tasks)])
    tau_star, masks = M.mmer(taus, k, alpha)
    star = tau_star.tolist()
    for tau_i, mask in zip(taus.tolist(), masks.tolist()):
        theta_i = [a + b for a, b in zip(theta0, tau_i)]
        best = min(l_distance(theta_i, theta0, star, m, 1) for m in itertools.product((0, 1), repeat=n))
        assert l_distance(theta_i, theta0, star, mask, 1) == best


@PROPERTY
@given(data=st.data())
def test_decouple_is_theta0_plus_masked_tau_star_in_theta0s_dtype(data):
    shape, dtype = data.draw(SHAPES), data.draw(st.sampled_from([F32, F64, BF16]))
    n = math.prod(shape)
    theta0 = torch.tensor(data.draw(entries(n, dtype, exact=False)), dtype=dtype).reshape(shape)
    tau_star = torch.tensor(data.draw(entries(n, F32, exact=False))).reshape(shape)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool).reshape(shape)
    exact_sums = [t0 + (s if m else 0.0) for t0, s, m in
                  zip(theta0.flatten().tolist(), tau_star.flatten().tolist(), mask.flatten().tolist())]
    to_dtype = {F32: f32, F64: lambda x: x, BF16: lambda x: bf16(f32(x))}[dtype]
    assert_entries(M.decouple(theta0, mask, tau_star), [to_dtype(x) for x in exact_sums], shape, dtype)


# ---- bit-packed masks -------------------------------------------------------------------------

MASK_SHAPES = st.sampled_from([(0,), (0, 3), (), (1,), (7,), (8,), (9,), (3, 5), (2, 2, 2), (4, 4), (17,)])


@PROPERTY
@given(shape=MASK_SHAPES, data=st.data())
def test_pack_mask_is_one_bit_per_entry_little_endian_and_round_trips(shape, data):
    n = math.prod(shape)
    bits = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    mask = torch.tensor(bits, dtype=torch.bool).reshape(shape)
    packed = M.pack_mask(mask)
    expected = [0] * math.ceil(n / 8)
    for i, bit in enumerate(bits):
        if bit:
            expected[i // 8] |= 1 << (i % 8)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.tolist() == expected
    unpacked = M.unpack_mask(packed, shape)
    assert unpacked.dtype == torch.bool and unpacked.shape == mask.shape and torch.equal(unpacked, mask)


def test_pack_mask_of_a_non_contiguous_mask():
    mask = torch.tensor([[True, False, True], [False, False, True]]).T
    assert torch.equal(M.unpack_mask(M.pack_mask(mask), mask.shape), mask)


@pytest.mark.parametrize(
    "packed, shape",
    [
        (torch.zeros(1, dtype=torch.uint8), (9,)),
        (torch.zeros(3, dtype=torch.uint8), (9,)),
        (torch.zeros(1, dtype=torch.uint8), (0,)),
        (torch.zeros(2, dtype=torch.int32), (9,)),
        (torch.zeros(1, 2, dtype=torch.uint8), (9,)),
    ],
)
def test_unpack_mask_rejects_a_packed_mask_of_the_wrong_size_or_type(packed, shape):
    with pytest.raises(ValueError, match=rf"packed mask for shape \({shape[0]},\) is {math.ceil(shape[0] / 8)} uint8 bytes"):
        M.unpack_mask(packed, shape)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.int64])
def test_pack_mask_rejects_a_non_bool_mask(dtype):
    with pytest.raises(ValueError, match=f"bool tensor, got {dtype}"):
        M.pack_mask(torch.ones(3, dtype=dtype))


# ---- whole models -------------------------------------------------------------------------------


@st.composite
def task_vector_dicts(draw):
    names = draw(st.lists(st.sampled_from(["embed", "layer.0.weight", "layer.0.bias", "head"]), min_size=1,
                          max_size=4, unique=True))
    shapes = {name: draw(SHAPES) for name in names}
    tasks = draw(st.integers(1, 4))
    return [
        {name: torch.tensor(draw(entries(math.prod(shape), F32, exact=True))).reshape(shape)
         for name, shape in shapes.items()}
        for _ in range(tasks)
    ]


@PROPERTY
@given(tvs=task_vector_dicts(), k=KS, alpha=ALPHAS)
def test_merge_state_dicts_applies_the_method_per_parameter(tvs, k, alpha):
    for name, merged in M.merge_state_dicts(tvs, M.task_arithmetic, alpha=alpha).items():
        expected = [f32(f32(alpha) * sum(column)) for column in zip(*(tv[name].flatten().tolist() for tv in tvs))]
        assert_entries(merged, expected, tvs[0][name].shape, F32)
    for name, merged in M.merge_state_dicts(tvs, M.ties, k=k, alpha=alpha).items():
        expected = ref_ties([tv[name].flatten().tolist() for tv in tvs], k, alpha, f32)
        assert_entries(merged, expected, tvs[0][name].shape, F32)


@PROPERTY
@given(tvs=task_vector_dicts(), k=KS, alpha=ALPHAS)
def test_merge_state_dicts_ties_with_each_tasks_global_threshold(tvs, k, alpha):
    thresholds = [M.magnitude_threshold(tv.values(), k) for tv in tvs]
    assert thresholds == [ref_threshold([t.flatten().tolist() for t in tv.values()], k) for tv in tvs]
    merged = M.merge_state_dicts(tvs, M.mmer, k=k, alpha=alpha, thresholds=thresholds)
    assert set(merged) == set(tvs[0])
    for name, (tau_star, masks) in merged.items():
        per_task_rows = [tv[name].flatten().tolist() for tv in tvs]
        expected = ref_ties(per_task_rows, k, alpha, f32, thresholds)
        assert_entries(tau_star, expected, tvs[0][name].shape, F32)
        assert rows(masks) == [ref_mask(tau, expected, 1.0, f32) for tau in per_task_rows]


# ---- TIES against PEFT ----------------------------------------------------------------------------


def peft_ties(taus: torch.Tensor, density: float, weights: list[float]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that density >= 1 prunes nothing
        return peft_merge.ties(list(taus), torch.tensor(weights), density)


@st.composite
def peft_comparable(draw):
    """Inputs on which both TIES coincide: distinct magnitudes (distinct powers of two, so no signed sum of
    non-zero entries is 0 and every sum is exact in float32), and density * n an integer."""
    tasks = draw(st.integers(1, 4))
    n = draw(st.integers(1, 24 // tasks))
    exponents = draw(st.permutations(range(-12, 12)))[: tasks * n]
    signs = draw(st.lists(st.sampled_from([-1.0, 0.0, 1.0]), min_size=tasks * n, max_size=tasks * n))
    taus = torch.tensor([s * 2.0**e for s, e in zip(signs, exponents)]).reshape(tasks, n)
    n_keep = draw(st.integers(0, n))
    density = n_keep / n
    assume(int(density * n) == math.ceil(density * n) == n_keep)
    return taus, density


@PROPERTY
@given(case=peft_comparable(), weight=st.sampled_from([0.5, 1.0, 2.0]))
def test_ties_equals_peft_ties_where_their_semantics_coincide(case, weight):
    """Weights all equal to w in PEFT are our alpha = w: PEFT weighs inside the disjoint mean, we scale after."""
    taus, density = case
    ours = M.ties(taus, k=density, alpha=weight)
    assert torch.equal(ours, peft_ties(taus, density, [weight] * len(taus)))


def test_peft_keeps_floor_density_n_entries_we_keep_ceil():
    """density 0.3 of 5 entries: PEFT keeps int(1.5) = 1, we keep ceil(1.5) = 2."""
    taus = torch.tensor([[5.0, -4.0, 3.0, 2.0, 1.0]])
    assert peft_ties(taus, 0.3, [1.0]).tolist() == [5.0, 0.0, 0.0, 0.0, 0.0]
    assert M.ties(taus, k=0.3).tolist() == [5.0, -4.0, 0.0, 0.0, 0.0]


def test_peft_keeps_exactly_k_entries_we_keep_all_tied_at_the_threshold():
    """Half of [3, 1, -1, 1]: PEFT's topk keeps 3 and one of the three 1s, we keep every |1| at the threshold."""
    taus = torch.tensor([[3.0, 1.0, -1.0, 1.0]])
    theirs = peft_ties(taus, 0.5, [1.0])
    assert int((theirs != 0).sum()) == 2 and theirs[0].item() == 3.0
    assert M.ties(taus, k=0.5).tolist() == [3.0, 1.0, -1.0, 1.0]


def test_peft_sends_a_zero_sum_to_plus_we_elect_zero():
    """Trimmed entries +1 and -1 cancel: PEFT's majority sign is +1 (sum >= 0), so it keeps +1; we elect 0."""
    taus = torch.tensor([[1.0, 2.0], [-1.0, 0.0]])
    assert peft_ties(taus, 1.0, [1.0, 1.0]).tolist() == [1.0, 2.0]
    assert M.ties(taus, k=1.0).tolist() == [0.0, 2.0]


def test_peft_elects_the_sign_before_weighting_prescaled_task_vectors_elect_after():
    """PEFT with weights (3, 1) elects sgn(1 - 2) = -1 on the raw deltas, then averages the weighted -2.
    Our TIES has one alpha after the mean; weighting tasks means scaling tau_t first, which elects sgn(3 - 2)."""
    taus = torch.tensor([[1.0], [-2.0]])
    assert peft_ties(taus, 1.0, [3.0, 1.0]).tolist() == [-2.0]
    assert M.ties(taus * torch.tensor([[3.0], [1.0]]), k=1.0).tolist() == [3.0]


# ---- errors that name the tensor and the problem ----------------------------------------------


def test_missing_shared_tensor_is_named():
    base = {"encoder.weight": torch.ones(2), "encoder.bias": torch.ones(2)}
    with pytest.raises(ValueError, match=r"lacks 1 base tensors: encoder\.bias"):
        M.task_vectors(base, {"encoder.weight": torch.ones(2)})


@pytest.mark.parametrize(
    "finetuned, message",
    [
        (torch.ones(3), r"'w': shape \(3,\) in the fine-tuned model, \(2,\) in the base"),
        (torch.ones(2, dtype=F64), r"'w': dtype torch\.float64 in the fine-tuned model, torch\.float32 in the base"),
        (torch.tensor([1.0, math.nan]), r"'w'.*fine-tuned.* 1 NaN or Inf"),
        (torch.tensor([math.inf, -math.inf]), r"'w'.*fine-tuned.* 2 NaN or Inf"),
    ],
)
def test_bad_fine_tuned_tensor_is_named_with_its_problem(finetuned, message):
    with pytest.raises(ValueError, match=message):
        M.task_vectors({"w": torch.ones(2)}, {"w": finetuned})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_base_or_private_tensor_is_named(bad):
    with pytest.raises(ValueError, match=r"'w'.*base.* 1 NaN or Inf"):
        M.task_vectors({"w": torch.tensor([bad, 0.0])}, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match=r"'head' has 1 NaN or Inf"):
        M.task_vectors({"w": torch.ones(2)}, {"w": torch.ones(2), "head": torch.tensor([bad])})


def test_merge_state_dicts_names_missing_extra_and_misshapen_tensors():
    first = {"a": torch.ones(2), "b": torch.ones(2)}
    with pytest.raises(ValueError, match=r"task 1.*missing \['b'\], extra \['c'\]"):
        M.merge_state_dicts([first, {"a": torch.ones(2), "c": torch.ones(2)}], M.task_arithmetic)
    with pytest.raises(ValueError, match=r"task 2.*missing \[\], extra \['c'\]"):
        M.merge_state_dicts([first, first, {**first, "c": torch.ones(1)}], M.task_arithmetic)
    with pytest.raises(ValueError, match=r"tensor 'b' has different shapes across tasks: \[\(2,\), \(3,\)\]"):
        M.merge_state_dicts([first, {"a": torch.ones(2), "b": torch.ones(3)}], M.task_arithmetic)


def test_empty_task_list_is_refused():
    with pytest.raises(ValueError, match="task list is empty"):
        M.merge_state_dicts([], M.ties)


def test_wrong_number_of_per_task_values_is_refused():
    taus = torch.ones(2, 3)
    with pytest.raises(ValueError, match="got 3 lam values for 2 tasks"):
        M.mmer(taus, lam=[1.0, 0.5, 0.25])
    with pytest.raises(ValueError, match="got 3 lam values for 2 tasks"):
        M.tall_masks(taus, taus.sum(0), [1.0, 0.5, 0.25])
    with pytest.raises(ValueError, match="threshold"):
        M.ties(taus, thresholds=[0.5])


@pytest.mark.parametrize("k", [-0.1, 1.5, math.nan])
def test_bad_trim_fraction_is_refused(k):
    for call in (lambda: M.trim(torch.ones(4), k), lambda: M.ties(torch.ones(2, 4), k),
                 lambda: M.magnitude_threshold([torch.ones(4)], k)):
        with pytest.raises(ValueError, match=r"k must lie in \[0, 1\]"):
            call()


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, math.nan])
def test_bad_dare_probability_is_refused(p):
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\)"):
        M.dare(torch.ones(2, 3), p, torch.Generator().manual_seed(0))


def test_lora_factors_that_do_not_chain_are_refused():
    with pytest.raises(ValueError, match=r"do not chain: A \(2, 5\), B \(4, 3\)"):
        M.lora_delta(torch.ones(2, 5), torch.ones(4, 3), 1.0)
