"""Uncertainty of the scores: intervals over seeds and paired intervals over test examples.

- `seed_interval`: mean, sample standard deviation and the Student-t 95% interval of a score over seeds,
  mean +- t_{0.975, n-1} s / sqrt(n) (what varies: expert training, data order, random draws).
- `paired_bootstrap`: the difference between two methods' average accuracy on the same test examples, with a
  percentile bootstrap interval. Examples are resampled within each task (stratified), the same indices for
  both methods, so the interval is of the paired difference, much narrower than two separate intervals when
  the methods err on the same examples; the average over tasks weights each task equally, as final accuracy does.
- `verdict`: the sentence an interval supports, and no more.
"""

from collections.abc import Sequence

import numpy as np
from scipy import stats as scipy_stats


def seed_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """{"mean", "std", "lo", "hi", "n"}; with one seed std and the interval are NaN (nothing to estimate from)."""
    x = np.asarray(values, dtype=float)
    n, mean = len(x), float(np.mean(x))
    if n < 2:
        return {"mean": mean, "std": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": n}
    std = float(np.std(x, ddof=1))
    half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * std / np.sqrt(n)
    return {"mean": mean, "std": std, "lo": mean - half, "hi": mean + half, "n": n}


def paired_bootstrap(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]], resamples: int = 10_000,
                     level: float = 0.95, seed: int = 0) -> dict:
    """a[t][i], b[t][i]: whether methods A and B got example i of task t right. Returns {"diff", "lo", "hi"}:
    diff = mean_t (acc_A(t) - acc_B(t)) and the percentile interval of its bootstrap distribution."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        raise ValueError(f"paired scores need the same examples: tasks {len(a)} vs {len(b)}, examples "
                         f"{[len(x) for x in a]} vs {[len(y) for y in b]}")
    rng = np.random.default_rng(seed)
    diffs = [np.asarray(x, dtype=float) - np.asarray(y, dtype=float) for x, y in zip(a, b)]
    boot = np.zeros(resamples)
    for d in diffs:  # per task: the mean difference over a resample of its examples, 1000 resamples at a time
        for start in range(0, resamples, 1000):
            rows = min(1000, resamples - start)
            boot[start:start + rows] += d[rng.integers(0, len(d), size=(rows, len(d)))].mean(axis=1)
    boot /= len(diffs)
    tail = (1 - level) / 2 * 100
    return {"diff": mean_difference(a, b), "lo": float(np.percentile(boot, tail)),
            "hi": float(np.percentile(boot, 100 - tail))}


def mean_difference(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]]) -> float:
    """mean_t (acc_A(t) - acc_B(t)): the difference of average accuracies, each task weighted equally."""
    return float(np.mean([np.mean(x) - np.mean(y) for x, y in zip(a, b)]))


def verdict(a: str, b: str, interval: dict, seeds: dict | None = None) -> str:
    """"A above B: +0.012 [0.004, 0.020]" when the interval excludes 0, else "A and B: no difference resolved".
    seeds: a second interval of the same difference (over seeds); then a side is claimed only if both exclude 0."""
    figures = f"{interval['diff']:+.3f} [{interval['lo']:+.3f}, {interval['hi']:+.3f}]"
    if seeds is not None:
        figures += f", over seeds [{seeds['lo']:+.3f}, {seeds['hi']:+.3f}]"
    intervals = [interval] + ([seeds] if seeds is not None else [])
    if all(i["lo"] > 0 for i in intervals):
        return f"{a} above {b}: {figures}"
    if all(i["hi"] < 0 for i in intervals):
        return f"{a} below {b}: {figures}"
    return f"{a} and {b}: no difference resolved, {figures}"
