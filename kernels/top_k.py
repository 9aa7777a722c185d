"""jax.lax.top_k of a decode step's logits on a CPU with AVX-512: the same values and indices, ties and NaN
included (IEEE total order, equal values by lower index first).

The sampler draws among each row's 256 largest logits (model/generation.py); XLA CPU takes them by a partial sort,
~9 ms of a 16-row 0.5B decode step over its 152k-token vocabulary. This kernel (`top_k.cc`, an XLA FFI custom call)
bounds the k-th largest from below by the k-th largest maximum of the row's blocks, collects the few entries at or
above the bound and sorts those: two passes over the row. Its output equals lax.top_k's bit for bit
(tests/test_top_k.py), so the draws, and a run's trajectories, do not depend on which one ran.

Built from source on first use (`native.py`); used where this CPU has AVX-512 F (`top_k_ready`) and the rows are on
one device (an FFI call is not split by the SPMD partitioner); `ROSA2_JAX_TOP_K=off` keeps XLA's.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from rosa2_jax.kernels import on_one_device
from rosa2_jax.kernels.native import load_kernel

SOURCE = Path(__file__).with_name("top_k.cc")
TARGET = "rosa2_top_k"


def top_k(x: Float[Array, "B V"], k: int) -> tuple[Float[Array, "B k"], Int[Array, "B k"]]:
    """(values, indices) of each row's k largest entries, as jax.lax.top_k gives them."""
    if not top_k_ready():
        raise RuntimeError("the top-k kernel does not run here (no AVX-512, no C++ compiler, or ROSA2_JAX_TOP_K=off): "
                           "use jax.lax.top_k")
    B, V = x.shape
    if not 1 <= k <= V:
        raise ValueError(f"top_k: k={k} must be in [1, {V}]")
    out = (jax.ShapeDtypeStruct((B, k), jnp.float32), jax.ShapeDtypeStruct((B, k), jnp.int32))
    return tuple(jax.ffi.ffi_call(TARGET, out)(x.astype(jnp.float32)))


@functools.cache
def top_k_ready() -> bool:
    """Whether the kernel runs here: an x86-64 Linux CPU with AVX-512 F, a C++ compiler to build it, and no
    `ROSA2_JAX_TOP_K=off`."""
    return load_kernel(SOURCE, {TARGET: "Rosa2TopK"}, switch="ROSA2_JAX_TOP_K", cpu={"avx512f"},
                       check="rosa2_top_k_ready", fallback="sampling keeps XLA's top-k")


def top_k_kernel_supported(mesh: jax.sharding.Mesh | None = None) -> bool:
    """Whether decode calls on `mesh` use the kernel: it is ready here and the rows are on one device."""
    return top_k_ready() and on_one_device(mesh)
