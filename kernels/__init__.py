"""Kernels, each beside a reference it is tested against: the Pallas per-row LoRA matmul (accelerators), and on
CPUs, as XLA FFI custom calls built on first use (`native.py`), the AMX matmul on packed bfloat16 weights, a decode
call's attention over its bfloat16 cache and the sampler's top-k (AVX-512)."""
