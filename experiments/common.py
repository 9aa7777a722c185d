"""Helpers shared by the benchmarks: wall-clock timing and the machine's measured matmul peak."""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Fastest of `repeats` runs (seconds); `fn` must block until its result is ready."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak_flops(n: int = 2048, dtype=jnp.float32) -> float:
    """Measured FLOP/s of one large square matmul on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    return 2 * n**3 / best_time(lambda: f(a).block_until_ready(), repeats=5)


def param_count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))
