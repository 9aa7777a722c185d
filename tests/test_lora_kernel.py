"""The Pallas per-row LoRA matmul against its jnp reference (Pallas interpret mode on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rosa2_jax.kernels.lora_matmul import lora_matmul, lora_matmul_reference


@pytest.mark.parametrize("B,T,I,O,R", [(1, 1, 64, 64, 8), (3, 17, 96, 160, 4), (2, 130, 64, 300, 8), (4, 8, 32, 48, 1)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_equals_reference(B, T, I, O, R, dtype):
    kx, kw, ka, kb = jax.random.split(jax.random.key(B * T + O), 4)
    x = jax.random.normal(kx, (B, T, I), dtype)
    w = (jax.random.normal(kw, (I, O)) / np.sqrt(I)).astype(dtype)
    a = jax.random.normal(ka, (B, I, R), jnp.float32) / np.sqrt(I)
    b = jax.random.normal(kb, (B, R, O), jnp.float32)
    ref = lora_matmul_reference(x.astype(jnp.float32), w.astype(jnp.float32), a, b, 2.0)
    out = lora_matmul(x, w, a, b, 2.0, block_t=64, block_o=128, interpret=True)
    assert out.shape == (B, T, O) and out.dtype == dtype
    tol = 1e-4 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=tol * np.abs(ref).max(), rtol=0)


def test_rows_use_their_own_adapter():
    x = jnp.ones((2, 4, 16))
    w = jnp.zeros((16, 8))
    a = jnp.stack([jnp.ones((16, 2)), jnp.zeros((16, 2))])
    b = jnp.ones((2, 2, 8))
    out = lora_matmul(x, w, a, b, 0.5, interpret=True)
    np.testing.assert_allclose(out[0], 0.5 * 16 * 2 * jnp.ones((4, 8)))
    np.testing.assert_allclose(out[1], jnp.zeros((4, 8)))
