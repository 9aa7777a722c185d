"""The AMX matmul (kernels/amx_matmul.py) against float64 products of the same bfloat16 numbers and against XLA's
own bfloat16 matmul (decoding on it: tests/test_generate.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rosa2_jax.kernels.amx_matmul import amx_matmul, amx_matmul_reference, amx_ready, pack_tiles, unpack_tiles
from rosa2_jax.model.decoder import decode_layout

needs_amx = pytest.mark.skipif(not amx_ready(), reason="this CPU has no AMX-BF16 (or no C++ compiler to build it)")


def test_tiles_hold_each_weight_where_the_tile_unit_reads_it():
    w = jnp.asarray(np.random.RandomState(0).randn(48, 96), jnp.bfloat16)
    tiles = pack_tiles(w)
    assert tiles.shape == (3, 3, 512)
    # tile (n, k) is [16 depth pairs, 16 columns, 2]: element (p, c, j) is w[16n + c, 32k + 2p + j]
    n, k, p, c, j = 2, 1, 5, 9, 1
    assert tiles[n, k, (p * 16 + c) * 2 + j] == w[16 * n + c, 32 * k + 2 * p + j]
    assert jnp.array_equal(unpack_tiles(tiles), w)


@needs_amx
@pytest.mark.parametrize("m", [1, 7, 16, 37])
@pytest.mark.parametrize("n,k", [(32, 64), (128, 896), (4864, 896), (896, 4864)])
def test_kernel_equals_float64_products_and_xlas_matmul(m, n, k):
    kx, kw = jax.random.split(jax.random.key(m * n + k))
    x = jax.random.normal(kx, (m, k), jnp.float32)
    w = jax.random.normal(kw, (n, k), jnp.bfloat16)
    y = np.asarray(jax.jit(amx_matmul)(x, pack_tiles(w)))
    exact = np.asarray(x.astype(jnp.bfloat16), np.float64) @ np.asarray(w, np.float64).T
    np.testing.assert_allclose(y, exact, rtol=0, atol=1e-5 * np.sqrt(k) * np.abs(exact).max())
    if m > 1 and k >= 896:  # XLA runs YNNPACK's AMX kernel here (one row: a GEMV of its own); the same depth order
        np.testing.assert_array_equal(y, np.asarray(jax.jit(amx_matmul_reference)(x, pack_tiles(w))))


def test_a_sharded_weight_keeps_xlas_matmul():
    mesh = jax.make_mesh((2,), ("model",), devices=jax.devices()[:2])
    w = jax.device_put(jnp.ones((2, 64, 32), jnp.bfloat16),
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "model")))
    params = {"embed": jnp.ones((16, 64), jnp.bfloat16), "layers": {"up": w}}
    decoded = decode_layout(params, jnp.bfloat16, out_in=True, pack="tiles")
    assert set(decoded["layers"][0]) == {"up_t"} and "head_tiles" in decoded  # the head is on one device
