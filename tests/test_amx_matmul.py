"""The AMX matmul (kernels/amx_matmul.py) against float64 products of the same bfloat16 numbers and against XLA's
own bfloat16 matmul, and the decode layout that uses it against the one that does not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rosa2_jax.checkpoint.hf_folder import load_hf_folder
from rosa2_jax.kernels.amx_matmul import amx_matmul, amx_matmul_reference, amx_ready, pack_tiles, unpack_tiles
from rosa2_jax.model.decoder import decode_layout, decoder_hidden, lm_logits, positions_from_valid
from rosa2_jax.model.generation import SamplingConfig, generate

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


@needs_amx
def test_decoding_on_tiles_gives_the_logits_and_tokens_of_xlas_matmul(tiny_hf):
    kind, _, folder = tiny_hf
    cfg, params = load_hf_folder(folder)
    tiled = decode_layout(params, jnp.bfloat16, pack="tiles")
    plain = decode_layout(params, jnp.bfloat16, pack=None)
    assert any(name.endswith("_tiles") for name in tiled["layers"][0]) and not any(
        name.endswith("_tiles") for name in plain["layers"][0])
    ids = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 24)))
    valid = jnp.ones(ids.shape, bool)
    logits = [lm_logits(p, decoder_hidden(p, ids, positions_from_valid(valid), valid, cfg=cfg)[0], cfg)
              for p in (tiled, plain)]
    np.testing.assert_allclose(logits[0], logits[1], rtol=0, atol=1e-4 * float(jnp.abs(logits[1]).max()))
    prompts = [list(map(int, row)) for row in ids[:, :12]]
    greedy = SamplingConfig(max_new_tokens=16, temperature=0.0)
    runs = [generate(p, cfg, prompts, greedy, stop_token_ids=[], pad_id=0) for p in (tiled, plain)]
    assert [g.tokens for g in runs[0]] == [g.tokens for g in runs[1]]


def test_a_sharded_weight_keeps_xlas_matmul():
    mesh = jax.make_mesh((2,), ("model",), devices=jax.devices()[:2])
    w = jax.device_put(jnp.ones((2, 64, 32), jnp.bfloat16),
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "model")))
    params = {"embed": jnp.ones((16, 64), jnp.bfloat16), "layers": {"up": w}}
    decoded = decode_layout(params, jnp.bfloat16, out_in=True, pack="tiles")
    assert set(decoded["layers"][0]) == {"up_t"} and "head_tiles" in decoded  # the head is on one device
