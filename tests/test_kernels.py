"""The fused kernels give merging.py's results bit for bit: same float32 operations, same order, same
rounding, on the values where an order or a rounding would show (ties at the threshold, signed zeros,
cancelling tasks, bfloat16 rounding ties, a length that ends mid-byte and spans several blocks)."""

import pytest
import torch

from mmer_cl import kernels, merging

N = 2 * kernels.BLOCK + 13  # several parallel blocks, the last mask byte partial


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


def hard_taus(n_tasks: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-4, 4, n_tasks)[torch.randperm(n_tasks, generator=generator)].reshape(-1, 1)
    taus = torch.randn(n_tasks, N, generator=generator) * scales
    taus[:, :16] = -0.0  # signed zeros everywhere
    taus[:, 16:32] = torch.where(torch.arange(n_tasks).reshape(-1, 1) % 2 == 0, 1.0, -1.0)  # cancellation
    taus[:, 32:48] = 1e-40  # subnormals
    taus[:, 48:64] = taus[:, 64:80]  # exact ties at any threshold that falls there
    return taus


@pytest.mark.parametrize("n_tasks", [1, 2, 3, 8, 9])
def test_mmer_packed_is_mmer_bit_for_bit(n_tasks):
    taus = hard_taus(n_tasks, seed=n_tasks)
    lams = [0.5 + 0.25 * t for t in range(n_tasks)]
    for k in (0.2, 1.0):
        thresholds = [merging.magnitude_threshold([tau], k) for tau in taus]
        tau_star, packed = kernels.mmer_packed(taus, 0.3, lams, thresholds)  # 0.3 is not a float32
        want_tau_star, want_masks = merging.mmer(taus, k, 0.3, lams, thresholds)
        assert same_bits(tau_star, want_tau_star)
        assert same_bits(packed, torch.stack([merging.pack_mask(m) for m in want_masks]))


def test_mmer_packed_refuses_a_wrong_number_of_thresholds():
    with pytest.raises(ValueError, match="3 task vectors, 2 thresholds"):
        kernels.mmer_packed(torch.zeros(3, 10), 1.0, [1.0] * 3, [0.0, 0.0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 0.3])
@pytest.mark.parametrize("tau_dtype", ["float32", "weights"])
def test_decouple_into_is_decouple_bit_for_bit(dtype, scale, tau_dtype):
    """A tau_star stored in the weights' dtype gives the bits of its exact float32 widening."""
    generator = torch.Generator().manual_seed(0)
    theta0 = (torch.randn(N, generator=generator) * 0.02).to(dtype)
    tau_star = torch.randn(N, generator=generator) * 0.002
    theta0[:64] = -0.0  # -0 + m * (+0 or tau): the sign of zero depends on m
    tau_star[:32] = 0.0
    tau_star[64:96] = 2.0 ** -9  # 1 + 2^-9 is a bfloat16 rounding tie
    theta0[64:96] = 1.0
    mask = torch.rand(N, generator=generator) < 0.5
    if tau_dtype == "weights":
        tau_star = tau_star.to(dtype)
    out = torch.full((N,), 7.0, dtype=dtype)
    kernels.decouple_into(out, theta0, tau_star, merging.pack_mask(mask), scale)
    assert same_bits(out, merging.decouple(theta0, mask, tau_star, scale))
    if dtype == torch.bfloat16:
        assert same_bits(out, merging.decouple(theta0, mask, tau_star.float(), scale))


def test_decouple_without_a_mask_is_theta0_plus_the_scaled_tau_star():
    """An all-ones mask (a merge with mask rule none), entry by entry in Python floats; float16, which no
    kernel covers, too."""
    import struct

    for dtype, rounding in ((torch.float32, "f"), (torch.float16, "e")):
        theta0, tau_star = torch.randn(37).to(dtype), torch.randn(37) * 1e-2
        out = torch.empty(37, dtype=dtype)
        kernels.decouple_into(out, theta0, tau_star, None, 0.5)
        f32 = lambda v: struct.unpack("<f", struct.pack("<f", v))[0]  # noqa: E731
        want = [struct.unpack("<" + rounding, struct.pack("<" + rounding, f32(float(t) + f32(f32(s) * 0.5))))[0]
                for t, s in zip(theta0.float(), tau_star)]
        assert out.float().tolist() == want


def test_decouple_into_writes_a_non_contiguous_target_too():
    theta0, tau_star = torch.randn(6, 5), torch.randn(6, 5)
    mask = torch.rand(6, 5) < 0.5
    out = torch.zeros(5, 6).T  # a transposed view
    kernels.decouple_into(out, theta0, tau_star, merging.pack_mask(mask))
    assert same_bits(out.contiguous(), merging.decouple(theta0, mask, tau_star))
    with pytest.raises(ValueError, match="3 mask bytes .want 4."):
        kernels.decouple_into(torch.zeros(30), theta0, tau_star, torch.zeros(3, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_task_vector_is_merging_task_vector(dtype):
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(N, generator=generator).to(dtype)
    finetuned = (base.double() + torch.randn(N, generator=generator) * 1e-3).to(dtype)
    assert same_bits(kernels.task_vector(base, finetuned), merging.task_vector(base, finetuned))
    for bad in (float("nan"), float("inf")):
        broken = finetuned.clone()
        broken[N - 1] = bad
        with pytest.raises(ValueError, match="'w' of the fine-tuned model.*1 NaN or Inf"):
            kernels.task_vector(base, broken, "w")
        with pytest.raises(ValueError, match="'w' of the base.*1 NaN or Inf"):
            kernels.task_vector(broken, finetuned, "w")


def test_magnitude_histograms_count_the_float_bits():
    x = hard_taus(1, seed=5)[0]
    bits = x.abs().view(torch.int32)
    assert torch.equal(kernels.magnitude_histogram(x), torch.bincount(bits >> 16, minlength=1 << 15))
    bucket = int((bits >> 16).mode().values)
    want = torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
    assert torch.equal(kernels.magnitude_histogram(x, bucket), want)
