"""Accelerator kernels (Pallas), each beside a pure-jnp reference it is tested against."""
