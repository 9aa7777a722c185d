"""x · Wᵀ on a CPU's FMA units for a bfloat16 weight packed once into panels: float32 out, each output summed over
depth in order.

On a CPU without AMX, XLA runs a decode step's matmuls ([16 rows, 896] x [896, 4864] and the like) at a fraction of
its square-matmul rate, with bfloat16 weights slower than float32 ones (BUILD_NOTES.md, "The kernels on AVX2").
`decoder.decode_layout` packs each bfloat16 matmul weight once (`pack_panels`: 16 output columns a panel, depth by
depth) and a decode step's matmuls call this kernel (an XLA FFI custom call, `fma_matmul.cc`) on the panels: each
panel is read from memory once and multiplied against every row while it sits in cache. x is rounded to bfloat16
first, as XLA's bfloat16 matmul rounds it, so the products are exact; each output adds them in depth order with one
rounding a step, another order than XLA's, the same on AVX-512 and on AVX2 (tests/test_fma_matmul.py).

Built from source on first use (`native.py`), its lane code for AVX-512 and for AVX2 in one library
(`simd_targets.h`); used where this CPU has one of them and no AMX (`amx_matmul` serves those), the weight on one
device; `ROSA2_JAX_FMA_MATMUL=off` keeps XLA's matmul.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, BFloat16, Float

from rosa2_jax.kernels.native import simd_level, use_avx512

SOURCE = Path(__file__).with_name("fma_matmul.cc")
TARGET = "rosa2_fma_matmul"
COLS = 16  # output columns in a panel
INTERLEAVE = np.arange(COLS).reshape(2, COLS // 2).T.reshape(-1)  # a depth's columns as stored: 0, 8, 1, 9, ...


def packable(w: Array) -> bool:
    """Whether a [out, in] weight can be packed: out a multiple of 16 (every Qwen2.5/Llama matrix)."""
    return w.ndim == 2 and w.shape[0] % COLS == 0


def pack_panels(w: BFloat16[Array, "N K"]) -> BFloat16[Array, "N/16 K 16"]:
    """[out, in] -> [out/16, in, 16]: panel n holds columns 16n.. depth by depth, each depth's 16 in the order
    0, 8, 1, 9, ..., 7, 15 that the kernel's loads unpack."""
    n, k = w.shape
    panels = w.astype(jnp.bfloat16).reshape(n // COLS, COLS, k).transpose(0, 2, 1)
    return panels[..., INTERLEAVE]


def unpack_panels(panels: BFloat16[Array, "N/16 K 16"]) -> BFloat16[Array, "N K"]:
    nt, k, _ = panels.shape
    return panels[..., np.argsort(INTERLEAVE)].transpose(0, 2, 1).reshape(nt * COLS, k)


def fma_matmul(x: Float[Array, "M K"], panels: BFloat16[Array, "N/16 K 16"], *, simd: str | None = None
               ) -> Float[Array, "M N"]:
    """x (rounded to bfloat16) times the packed weight's transpose, summed in float32 depth by depth. `simd`
    ("avx512" or "avx2"; default: the best this CPU runs) picks the lane code."""
    available = fma_matmul_simd()
    if available is None:
        raise RuntimeError("the FMA matmul kernel does not run here (no AVX2 and FMA, no C++ compiler, or "
                           "ROSA2_JAX_FMA_MATMUL=off): build the decode layout with pack=None")
    avx512 = use_avx512(simd, available, "fma_matmul")
    out = jax.ShapeDtypeStruct((x.shape[0], panels.shape[0] * COLS), jnp.float32)
    x = x.astype(jnp.bfloat16).astype(jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x, panels, avx512=avx512)


def fma_matmul_reference(x: Float[Array, "M K"], panels: BFloat16[Array, "N/16 K 16"]) -> Float[Array, "M N"]:
    """XLA's bfloat16 matmul of the same numbers (its sums in another order)."""
    return jnp.einsum("mk,nk->mn", x.astype(jnp.bfloat16), unpack_panels(panels), preferred_element_type=jnp.float32)


@functools.cache
def fma_matmul_simd() -> str | None:
    """The lane code the kernel runs here, "avx512" or "avx2" (an x86-64 Linux CPU with AVX-512 F/BW/VL, or AVX2
    and FMA, and a C++ compiler to build it), or None (elsewhere, or with `ROSA2_JAX_FMA_MATMUL=off`)."""
    return simd_level(SOURCE, {TARGET: "Rosa2FmaMatmul"}, switch="ROSA2_JAX_FMA_MATMUL",
                      check="rosa2_fma_matmul_simd", fallback="bfloat16 decoding keeps XLA's matmul")
