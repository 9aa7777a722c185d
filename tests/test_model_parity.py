"""Our decoder against HF transformers (torch) on tiny random llama / qwen2 / qwen3 models."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import hf_logits

from rosa2_jax.checkpoint.hf_folder import load_hf_folder
from rosa2_jax.model.decoder import QUERY_BLOCK, causal_attention, forward, prefix_attention
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


def test_logits_match_hf_past_a_query_block(tiny_hf, rng):
    """Teacher forcing runs its queries in blocks (causal_attention); rows longer than two blocks, left-padded."""
    kind, model, folder = tiny_hf
    cfg, params = load_hf_folder(folder)
    lengths = (2 * QUERY_BLOCK + 37, QUERY_BLOCK + 5)
    rows = [rng.randint(0, cfg.vocab_size, n).tolist() for n in lengths]
    tokens, valid = left_pad(rows, max(lengths), pad_id=0)
    ours = np.asarray(forward(jax.tree.map(jnp.asarray, params), jnp.asarray(tokens), jnp.asarray(valid), cfg=cfg))
    T = tokens.shape[1]
    for i, row in enumerate(rows):
        np.testing.assert_allclose(ours[i, T - len(row):], hf_logits(model, row), atol=1e-4, rtol=0,
                                   err_msg=f"{kind} row {i}")


def _masked_attention(q, k, v, mask):
    """Plain grouped-query attention: every kv head repeated for its H/K query heads, one masked softmax."""
    G = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(mask[:, None], scores, -1e30), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs, v).reshape(*q.shape[:2], -1)


def test_blocked_causal_attention_equals_masked_attention_and_its_gradient(rng):
    """causal_attention (query blocks over the keys up to each block's end, mask as a bias) against the plain
    masked softmax, values and VJP, with left padding and a length that is not a multiple of the block."""
    B, T, H, K, D = 2, 23, 6, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, D)), jnp.float32) for n in (H, K, K))
    valid = jnp.arange(T)[None] >= jnp.asarray([[0], [9]])  # row 1 left-padded by 9
    mask = jnp.tril(jnp.ones((T, T), bool))[None] & valid[:, None, :]
    cotangent = jnp.asarray(rng.standard_normal((B, T, H * D)), jnp.float32) * valid[..., None]
    ref, ref_vjp = jax.vjp(lambda *a: _masked_attention(*a, mask), q, k, v)
    for block in (0, 5, 8, T):
        out, out_vjp = jax.vjp(lambda *a: causal_attention(*a, mask, block), q, k, v)
        np.testing.assert_allclose(out * valid[..., None], ref * valid[..., None], atol=1e-6, err_msg=f"block {block}")
        for got, want in zip(out_vjp(cotangent), ref_vjp(cotangent)):
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"block {block}")


def _softmax_attention_f64(q, k, v, mask):
    """Per query head h (kv head h // G), softmax(q kᵀ / sqrt(D)) v over the unmasked keys, in float64 (a query with
    none left at 0)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, D = q.shape
    G = H // k.shape[2]
    out = np.zeros((B, T, H, D))
    for b, t, h in np.ndindex(B, T, H):
        keep = np.asarray(mask[b, t])
        if not keep.any():
            continue
        s = k[b, keep, h // G] @ q[b, t, h] / np.sqrt(D)
        p = np.exp(s - s.max())
        out[b, t, h] = (p / p.sum()) @ v[b, keep, h // G]
    return out.reshape(B, T, H * D)


def test_prefill_attention_equals_a_float64_softmax(rng):
    """A prefill's attention, fresh (`causal_attention`) and after a cached prefix (`prefix_attention`, the cache in
    the token engine's [K, D, S] / [K, S, D] layouts with a hole), against a float64 softmax per query head, whole and
    in query blocks (the last one short): the query heads sharing a kv head are computed as the rows of one matrix
    (decoder.group_rows)."""
    B, T, S, H, K, D = 2, 13, 7, 6, 2, 8
    q, k, v = (rng.standard_normal((B, T, n, D)).astype(np.float32) for n in (H, K, K))
    ck, cv = (rng.standard_normal((B, S, K, D)).astype(np.float32) for _ in range(2))
    self_mask = np.tril(np.ones((T, T), bool))[None].repeat(B, 0)
    self_mask[1, :, 0] = False  # row 1's first new token is padding
    cache_mask = np.arange(S)[None] < np.array([[S], [4]])
    cache_mask[0, 2] = False  # a hole in row 0's cache
    both = np.concatenate([cache_mask[:, None].repeat(T, 1), self_mask], -1)
    want = _softmax_attention_f64(q, np.concatenate([ck, k], 1), np.concatenate([cv, v], 1), both)
    for block in (0, 5, T):
        fresh = causal_attention(*(jnp.asarray(x) for x in (q, k, v, self_mask)), block)
        np.testing.assert_allclose(fresh[0], _softmax_attention_f64(q, k, v, self_mask)[0], atol=2e-6)
        extended = prefix_attention(*(jnp.asarray(x) for x in (q, k, v, ck.transpose(0, 2, 3, 1),
                                                               cv.transpose(0, 2, 1, 3), cache_mask, self_mask)), block)
        np.testing.assert_allclose(extended, want, atol=2e-6, err_msg=f"block {block}")


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
