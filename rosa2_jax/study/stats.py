"""Intervals and paired tests for comparing methods on the same problems (numpy only).

- `wilson_interval`: 95% interval of a proportion (accuracy within K, accuracy by turn);
- `paired_bootstrap`: the difference of two methods' accuracies on the same problems, with a percentile
  interval from resampling problems (the pairs stay together);
- `mcnemar_exact`: the two-sided exact McNemar p-value from the discordant pairs (problems only one of
  the two methods solved), a binomial test of b against Bin(b + c, 1/2).
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact p-value: P(|X - n/2| >= |only_a - n/2|) for X ~ Bin(n, 1/2), n = only_a + only_b."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, resamples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """(mean(a - b), lower, upper): the percentile interval of the mean paired difference."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.size == 0:
        return 0.0, 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(d.mean()), float(lo), float(hi)


def paired_comparison(solved_a: dict[str, bool], solved_b: dict[str, bool]) -> dict:
    """Method a against method b on the problems both ran (problem id -> solved within K)."""
    common = sorted(set(solved_a) & set(solved_b))
    a = np.array([solved_a[p] for p in common], bool)
    b = np.array([solved_b[p] for p in common], bool)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    diff, lo, hi = paired_bootstrap(a, b)
    return {"problems": len(common), "accuracy_a": float(a.mean()) if common else 0.0,
            "accuracy_b": float(b.mean()) if common else 0.0, "difference": diff, "ci95": [lo, hi],
            "only_a": only_a, "only_b": only_b, "mcnemar_p": mcnemar_exact(only_a, only_b)}
