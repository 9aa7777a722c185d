"""x · Wᵀ on a CPU's AMX tile unit: bfloat16 in, float32 out, the weight packed into tiles once.

XLA CPU already runs a bfloat16 decode matmul through YNNPACK's AMX kernel, but it repacks the weight into the
tile layout at every call: in a 0.5B decode step's MLP, `perf` shows the repacking (`ynn::transpose_x32`) taking
five times as long as the dot itself, the weight read twice and written once. `decoder.decode_layout` packs each
bfloat16 matmul weight once (`pack_tiles`), and a decode step's matmuls call this kernel (an XLA FFI custom call,
`amx_matmul.cc`) on the packed tiles: the weight is read once. Each output tile accumulates over depth in the order
YNNPACK's kernel does, so the results equal XLA's bit for bit on the model's shapes (tests/test_amx_matmul.py).

The kernel is built from source on first use with the system's C++ compiler (`native.py`) and is used only where
this CPU has AMX-BF16 (`amx_ready`); anywhere else, or with `ROSA2_JAX_AMX=off`, decoding keeps XLA's matmul.
Forward only, one device: a sharded weight keeps XLA's path.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
from jaxtyping import Array, BFloat16, Float

from rosa2_jax.kernels.native import load_kernel

SOURCE = Path(__file__).with_name("amx_matmul.cc")
TARGET = "rosa2_amx_matmul"
ROWS, COLS, DEPTH = 16, 16, 32  # an AMX tile: 16 rows of x, 16 output columns, 32 bfloat16 of depth


def packable(w: Array) -> bool:
    """Whether a [out, in] weight can be packed: out a multiple of 16, in of 32 (every Qwen2.5/Llama matrix)."""
    return w.ndim == 2 and w.shape[0] % COLS == 0 and w.shape[1] % DEPTH == 0


def pack_tiles(w: BFloat16[Array, "N K"]) -> BFloat16[Array, "N/16 K/32 512"]:
    """[out, in] -> [out/16, in/32, 512]: tile (n, k) is columns 16n.. and depths 32k.. as [16 depth pairs, 16
    columns, 2], the layout TDPBF16PS reads its second operand in."""
    n, k = w.shape
    tiles = w.astype(jnp.bfloat16).reshape(n // COLS, COLS, k // DEPTH, DEPTH // 2, 2)
    return tiles.transpose(0, 2, 3, 1, 4).reshape(n // COLS, k // DEPTH, DEPTH * COLS)


def unpack_tiles(tiles: BFloat16[Array, "N/16 K/32 512"]) -> BFloat16[Array, "N K"]:
    nt, kt, _ = tiles.shape
    return tiles.reshape(nt, kt, DEPTH // 2, COLS, 2).transpose(0, 3, 1, 2, 4).reshape(nt * COLS, kt * DEPTH)


def amx_matmul(x: Float[Array, "M K"], tiles: BFloat16[Array, "N/16 K/32 512"]) -> Float[Array, "M N"]:
    """x (rounded to bfloat16) times the packed weight's transpose, accumulated and returned in float32."""
    if not amx_ready():
        raise RuntimeError("the AMX kernel does not run here (no AMX-BF16, no C++ compiler, or ROSA2_JAX_AMX=off): "
                           "build the decode layout with tiles=False")
    out = jax.ShapeDtypeStruct((x.shape[0], tiles.shape[0] * COLS), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x.astype(jnp.bfloat16), tiles)


def amx_matmul_reference(x: Float[Array, "M K"], tiles: BFloat16[Array, "N/16 K/32 512"]) -> Float[Array, "M N"]:
    return jnp.einsum("mk,nk->mn", x.astype(jnp.bfloat16), unpack_tiles(tiles), preferred_element_type=jnp.float32)


@functools.cache
def amx_ready() -> bool:
    """Whether decode matmuls run on the AMX kernel here: an x86-64 Linux CPU with AMX-BF16, a C++ compiler to
    build it, and no `ROSA2_JAX_AMX=off`. Says why once when a CPU that has AMX cannot use it."""
    return bool(load_kernel(SOURCE, {TARGET: "Rosa2AmxMatmul"}, switch="ROSA2_JAX_AMX", cpu={"amx_bf16"},
                            check="rosa2_amx_ready",
                            fallback="bfloat16 decoding keeps XLA's matmul, which repacks every weight at every call"))
