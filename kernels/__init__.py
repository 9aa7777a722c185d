"""Kernels, each beside a pure-jnp reference it is tested against: the Pallas per-row LoRA matmul (accelerators)
and the AMX matmul on packed bfloat16 weights (CPUs with AMX, an XLA FFI custom call)."""
