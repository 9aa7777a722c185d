"""A decode step's attention over a bfloat16 cache and its decode call's buffer, on a CPU with AVX-512 or AVX2.

`decoder.decode_attention` with a buffer (the token engine's bfloat16 cache, read-only inside a decode call) is two
small batched dots per part and a softmax; XLA CPU runs them at per-call cost more than at the bytes they read (24
layers at 16 rows x 384 slots: ~27 ms of a ~94 ms step, BUILD_NOTES.md). This kernel (`decode_attention.cc`, an XLA
FFI custom call) computes the same per (row, kv head) on XLA's thread pool and reads only the slots between a row's
first valid one and its last, so a row early in its session no longer pays for the longest row's cache. The same
roundings (query and probabilities in bfloat16, float32 sums); only the order of the float32 sums and exp's last
bit differ from XLA's (tests/test_decode_attention.py).

Built from source on first use (`native.py`), its lane code for AVX-512 F/BW/VL and for AVX2 with FMA in one library
(`simd_targets.h`: the same operations lane by lane and the same reductions, so the same bits on either); used where
this CPU has one of them (`attention_simd`) and the rows are on one device (an FFI call is not split by the SPMD
partitioner); `ROSA2_JAX_ATTENTION=off` keeps XLA's.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
from jaxtyping import Array, BFloat16, Bool, Float

from rosa2_jax.kernels import on_one_device
from rosa2_jax.kernels.native import simd_level, use_avx512

SOURCE = Path(__file__).with_name("decode_attention.cc")
TARGET = "rosa2_decode_attention"
KERNEL_HEAD_DIM = 16  # the head dimension must be a multiple of this (a float32 vector)


def buffered_decode_attention(
    q: BFloat16[Array, "B K G D"],
    cache_k: BFloat16[Array, "B K D S"], cache_v: BFloat16[Array, "B K S D"], cache_mask: Bool[Array, "B S"],
    buffer_k: BFloat16[Array, "B K D T"], buffer_v: BFloat16[Array, "B K T D"], buffer_mask: Bool[Array, "B T"],
    *, simd: str | None = None,
) -> Float[Array, "B K G D"]:
    """Each row's query heads (grouped by kv head) attending to the cache's and the buffer's valid slots in one
    softmax; D a multiple of KERNEL_HEAD_DIM. Every row needs a valid slot (its own token's, in the buffer).
    `simd` ("avx512" or "avx2"; default: the best this CPU runs) picks the lane code."""
    available = attention_simd()
    if available is None:
        raise RuntimeError("the decode attention kernel does not run here (no AVX2, no C++ compiler, or "
                           "ROSA2_JAX_ATTENTION=off): decode with attention_kernel=False")
    avx512 = use_avx512(simd, available, "decode attention")
    B, _, _, _ = q.shape
    cache_mask = jnp.broadcast_to(cache_mask, (B, cache_mask.shape[-1]))
    buffer_mask = jnp.broadcast_to(buffer_mask, (B, buffer_mask.shape[-1]))
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(q, cache_k, cache_v, cache_mask, buffer_k, buffer_v, buffer_mask,
                                         avx512=avx512)


@functools.cache
def attention_simd() -> str | None:
    """The lane code a buffered decode step's attention runs on here, "avx512" or "avx2" (an x86-64 Linux CPU with
    AVX-512 F/BW/VL, or AVX2 and FMA, and a C++ compiler to build it), or None (elsewhere, or with
    `ROSA2_JAX_ATTENTION=off`)."""
    return simd_level(SOURCE, {TARGET: "Rosa2DecodeAttention"}, switch="ROSA2_JAX_ATTENTION",
                      check="rosa2_attention_simd", fallback="decoding keeps XLA's attention")


def attention_ready() -> bool:
    """Whether a buffered decode step's attention can run on the kernel here (`attention_simd`)."""
    return attention_simd() is not None


def attention_kernel_supported(mesh: jax.sharding.Mesh | None = None) -> bool:
    """Whether decode calls on `mesh` use the kernel: it is ready here and the rows are on one device."""
    return attention_ready() and on_one_device(mesh)
