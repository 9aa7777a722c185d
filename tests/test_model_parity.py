"""Our decoder against HF transformers (torch) on tiny random llama / qwen2 / qwen3 models."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import hf_logits

from rosa2_jax.checkpoint.hf_folder import load_hf_folder
from rosa2_jax.model.decoder import forward
from rosa2_jax.model.generation import left_pad

LENGTHS = (7, 19, 1, 12)


def _batch(rng, vocab):
    rows = [rng.randint(0, vocab, n).tolist() for n in LENGTHS]
    tokens, valid = left_pad(rows, max(LENGTHS), pad_id=0)
    return rows, jnp.asarray(tokens), jnp.asarray(valid)


def test_logits_match_hf_on_rows_of_different_lengths(tiny_hf, rng):
    kind, model, folder = tiny_hf
    cfg, params = load_hf_folder(folder)
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.qk_norm == (kind == "qwen3")
    assert (cfg.rope_scaling is not None) == kind.startswith("llama3")
    rows, tokens, valid = _batch(rng, cfg.vocab_size)
    ours = np.asarray(forward(jax.tree.map(jnp.asarray, params), tokens, valid, cfg=cfg))
    T = tokens.shape[1]
    for i, row in enumerate(rows):
        ref = hf_logits(model, row)
        np.testing.assert_allclose(ours[i, T - len(row):], ref, atol=1e-4, rtol=0, err_msg=f"{kind} row {i}")


def test_bfloat16_forward_tracks_float32(tiny_hf, rng):
    _, _, folder = tiny_hf
    cfg, params = load_hf_folder(folder)
    _, tokens, valid = _batch(rng, cfg.vocab_size)
    f32 = forward(jax.tree.map(jnp.asarray, params), tokens, valid, cfg=cfg)
    bf16 = forward(jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params), tokens, valid, cfg=cfg)
    assert bf16.dtype == jnp.float32  # the LM head accumulates in float32
    err = jnp.abs(bf16 - f32)[valid]
    assert float(err.max()) < 0.1 * float(jnp.abs(f32).max())
    assert float(err.mean()) < 0.01 * float(jnp.abs(f32).max())
