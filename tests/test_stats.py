"""The statistics behind every interval the benchmark reports, against cases worked out by hand."""

import math

import numpy as np
import pytest

from mmer_cl.stats import paired_bootstrap, seed_interval, verdict


def test_seed_interval_is_the_student_t_interval():
    out = seed_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} s / sqrt(n), s = 1
    assert out["mean"] == 2.0 and out["std"] == 1.0 and out["n"] == 3
    assert out["lo"] == pytest.approx(2.0 - half) and out["hi"] == pytest.approx(2.0 + half)
    one = seed_interval([0.7])
    assert one["mean"] == 0.7 and math.isnan(one["std"]) and math.isnan(one["lo"])


def test_a_constant_paired_difference_has_no_spread():
    # task 0: A right where B is wrong on all 3 examples (+1); task 1: the same answers (0): mean +0.5
    out = paired_bootstrap([[1, 1, 1], [1, 0]], [[0, 0, 0], [1, 0]], resamples=500)
    assert out == {"diff": 0.5, "lo": 0.5, "hi": 0.5}


def test_two_examples_give_the_enumerated_bootstrap_distribution():
    # differences [0, 1]: a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4
    out = paired_bootstrap([[1, 1]], [[1, 0]], resamples=20_000)
    assert out["diff"] == 0.5 and out["lo"] == 0.0 and out["hi"] == 1.0
    rng = np.random.default_rng(0)
    means = rng.integers(0, 2, size=(20_000, 2)).mean(1)
    assert abs(np.mean(means == 0.5) - 0.5) < 0.02  # what the percentiles above rest on


def test_the_interval_matches_the_normal_approximation_on_many_examples():
    rng = np.random.default_rng(1)
    a = rng.random(4000) < 0.8
    b = np.where(rng.random(4000) < 0.9, a, ~a)  # B disagrees with A on about a tenth of the examples
    out = paired_bootstrap([a], [b], resamples=4000)
    d = a.astype(float) - b.astype(float)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert out["diff"] == pytest.approx(d.mean())
    assert out["lo"] == pytest.approx(d.mean() - half, abs=0.003)
    assert out["hi"] == pytest.approx(d.mean() + half, abs=0.003)


def test_unpaired_scores_are_refused():
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap([[1, 0]], [[1, 0, 1]])


def test_verdict_says_only_what_the_interval_supports():
    assert verdict("MMER", "TIES", {"diff": 0.02, "lo": 0.01, "hi": 0.03}) == "MMER above TIES: +0.020 [+0.010, +0.030]"
    assert verdict("MMER", "EMR", {"diff": -0.02, "lo": -0.03, "hi": -0.01}).startswith("MMER below EMR")
    assert verdict("MMER", "TALL", {"diff": 0.01, "lo": -0.01, "hi": 0.03}).startswith("MMER and TALL: no difference")


def test_a_side_is_claimed_over_seeds_only_where_both_intervals_exclude_zero():
    examples = {"diff": 0.02, "lo": 0.01, "hi": 0.03}
    assert verdict("MMER", "TIES", examples, seeds={"lo": 0.005, "hi": 0.04}).startswith("MMER above TIES")
    assert verdict("MMER", "TIES", examples, seeds={"lo": -0.01, "hi": 0.05}) == (
        "MMER and TIES: no difference resolved, +0.020 [+0.010, +0.030], over seeds [-0.010, +0.050]")


def test_paired_over_seeds_pools_the_examples_and_intervals_the_seed_differences():
    from mmer_cl.bench.tables import paired_seeds_table

    # per seed, one task of 4 examples; mmer_exact beats ties by 1/4, 2/4 and 3/4 on seeds 0, 1, 2
    ref, other = [[1, 1, 1, 1]], ([[0, 1, 1, 1]], [[0, 0, 1, 1]], [[0, 0, 0, 1]])
    by_seed = {s: {"s": {"mmer_exact": {"correct": ref}, "ties": {"correct": b}, "naive": {"matrix": []}}}
               for s, b in enumerate(other)}
    row = paired_seeds_table(by_seed, "s").iloc[0]
    half = 4.302652729911275 * 0.25 / math.sqrt(3)  # t_{0.975, 2} s / sqrt(3), s = 1/4
    assert row["method"] == "ties" and row["seeds"] == 3 and row["diff"] == pytest.approx(0.5)
    assert row["seed_lo"] == pytest.approx(0.5 - half) and row["seed_hi"] == pytest.approx(0.5 + half)
    assert row["lo"] > 0 and row["seed_lo"] < 0 and "no difference resolved" in row["verdict"]
    assert len(paired_seeds_table({0: by_seed[0]}, "s")) == 0  # one seed: no spread to estimate
