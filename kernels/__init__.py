"""Kernels, each beside a pure-jnp reference it is tested against: the Pallas per-row LoRA matmul (accelerators),
and on CPUs, as XLA FFI custom calls built on first use (`native.py`), the AMX matmul on packed bfloat16 weights and
a decode call's attention over its bfloat16 cache (AVX-512)."""
