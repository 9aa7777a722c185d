"""jax.lax.top_k of a decode step's logits on a CPU with AVX-512 or AVX2: the same values and indices, ties and NaN
included (IEEE total order, equal values by lower index first).

The sampler draws among each row's 256 largest logits (model/generation.py); XLA CPU takes them by a partial sort,
~9 ms of a 16-row 0.5B decode step over its 152k-token vocabulary. This kernel (`top_k.cc`, an XLA FFI custom call)
bounds the k-th largest from below by the k-th largest maximum of the row's blocks, collects the few entries at or
above the bound and sorts those: two passes over the row. Its output equals lax.top_k's bit for bit
(tests/test_top_k.py), so the draws, and a run's trajectories, do not depend on which one ran.

Built from source on first use (`native.py`), its passes for AVX-512 and for AVX2 in one library (`simd_targets.h`);
used where this CPU has one of them (`top_k_simd`) and the rows are on one device (an FFI call is not split by the
SPMD partitioner); `ROSA2_JAX_TOP_K=off` keeps XLA's.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from rosa2_jax.kernels import on_one_device
from rosa2_jax.kernels.native import simd_level, use_avx512

SOURCE = Path(__file__).with_name("top_k.cc")
TARGET = "rosa2_top_k"


def top_k(x: Float[Array, "B V"], k: int, *, simd: str | None = None
          ) -> tuple[Float[Array, "B k"], Int[Array, "B k"]]:
    """(values, indices) of each row's k largest entries, as jax.lax.top_k gives them. `simd` ("avx512" or "avx2";
    default: the best this CPU runs) picks the passes' lane code."""
    available = top_k_simd()
    if available is None:
        raise RuntimeError("the top-k kernel does not run here (no AVX2, no C++ compiler, or ROSA2_JAX_TOP_K=off): "
                           "use jax.lax.top_k")
    avx512 = use_avx512(simd, available, "top_k")
    B, V = x.shape
    if not 1 <= k <= V:
        raise ValueError(f"top_k: k={k} must be in [1, {V}]")
    out = (jax.ShapeDtypeStruct((B, k), jnp.float32), jax.ShapeDtypeStruct((B, k), jnp.int32))
    return tuple(jax.ffi.ffi_call(TARGET, out)(x.astype(jnp.float32), avx512=avx512))


@functools.cache
def top_k_simd() -> str | None:
    """The lane code the kernel runs here, "avx512" or "avx2" (an x86-64 Linux CPU with AVX-512 F/BW/VL, or AVX2
    and FMA, and a C++ compiler to build it), or None (elsewhere, or with `ROSA2_JAX_TOP_K=off`)."""
    return simd_level(SOURCE, {TARGET: "Rosa2TopK"}, switch="ROSA2_JAX_TOP_K", check="rosa2_top_k_simd",
                      fallback="sampling keeps XLA's top-k")


def top_k_ready() -> bool:
    """Whether the kernel runs here (`top_k_simd`)."""
    return top_k_simd() is not None


def top_k_kernel_supported(mesh: jax.sharding.Mesh | None = None) -> bool:
    """Whether decode calls on `mesh` use the kernel: it is ready here and the rows are on one device."""
    return top_k_ready() and on_one_device(mesh)
