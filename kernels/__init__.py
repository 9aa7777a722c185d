"""Kernels, each beside a reference it is tested against: the Pallas per-row LoRA matmul (accelerators), and on
CPUs, as XLA FFI custom calls built on first use (`native.py`), the AMX matmul on packed bfloat16 weights, and
(AVX-512 or AVX2, `simd16.h`) the FMA matmul on packed bfloat16 weights, a decode call's attention over its bfloat16
cache and the sampler's top-k."""

from __future__ import annotations

from jax.sharding import Mesh


def on_one_device(mesh: Mesh | None) -> bool:
    """Whether arrays on `mesh` (None: the default device) live on one device, where a kernel may run: the SPMD
    partitioner does not split a custom call (an FFI call or a pallas_call), so sharded arrays keep XLA's ops."""
    return mesh is None or mesh.size == 1
