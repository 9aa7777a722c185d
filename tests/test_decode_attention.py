"""The decode attention kernel (kernels/decode_attention.py) against a float64 softmax of the same bfloat16 numbers
and against XLA's `decoder.decode_attention`, and decode calls that use it against those that do not."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_chat_model
from experiments.common import prefilled_rows
from rosa2_jax.checkpoint import load_model
from rosa2_jax.kernels.decode_attention import attention_ready, attention_simd, buffered_decode_attention
from rosa2_jax.model.decode_rows import decode_chunk
from rosa2_jax.model.decoder import cache_dtype, decode_attention, decode_layout
from rosa2_jax.model.generation import SamplingConfig

needs_kernel = pytest.mark.skipif(not attention_ready(), reason="this CPU has no AVX2 (or no C++ compiler)")


def attention_inputs(seed, B, K, G, D, S, T, cache_lengths, buffer_lengths):
    """Random bfloat16 query/keys/values; row b holds cache slots [0, cache_lengths[b]) with a hole at slot 3 of row
    1, and buffer slots [0, buffer_lengths[b])."""
    rng = np.random.default_rng(seed)

    def bf16(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.bfloat16)

    cache_mask = np.arange(S)[None] < np.asarray(cache_lengths)[:, None]
    if B > 1 and cache_lengths[1] > 3:
        cache_mask[1, 3] = False
    buffer_mask = np.arange(T)[None] < np.asarray(buffer_lengths)[:, None]
    return (bf16(B, K, G, D), bf16(B, K, D, S), bf16(B, K, S, D), jnp.asarray(cache_mask), bf16(B, K, D, T),
            bf16(B, K, T, D), jnp.asarray(buffer_mask))


def float64_attention(q, cache_k, cache_v, cache_mask, buffer_k, buffer_v, buffer_mask):
    """The same computation in float64, the probabilities rounded to bfloat16 as the kernel and XLA round them."""
    f64 = functools.partial(np.asarray, dtype=np.float64)
    keys = np.concatenate([f64(cache_k), f64(buffer_k)], -1)  # [B, K, D, S + T]
    values = np.concatenate([f64(cache_v), f64(buffer_v)], -2)
    mask = np.concatenate([np.asarray(cache_mask), np.asarray(buffer_mask)], -1)
    scores = np.einsum("bkgd,bkds->bkgs", f64(q), keys) / np.sqrt(q.shape[-1])
    scores = np.where(mask[:, None, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs = np.asarray(jnp.asarray(probs / probs.sum(-1, keepdims=True), jnp.float32).astype(jnp.bfloat16), np.float64)
    return np.einsum("bkgs,bksd->bkgd", probs, values)


@needs_kernel
@pytest.mark.parametrize("G,D", [(7, 64), (1, 16), (9, 32), (3, 128)])
@pytest.mark.parametrize("S,T", [(37, 5), (384, 16)])
@pytest.mark.parametrize("peak", [1.0, 16.0])
def test_kernel_equals_a_float64_softmax_and_xlas_attention(G, D, S, T, peak):
    """`peak` scales the queries: at 16 most probabilities underflow to 0 beside a few near 1."""
    B, K = 5, 2
    cache_lengths = [0, S // 2, S, 7, S - 1]  # row 0 attends to its buffer only
    buffer_lengths = [1, T, 2, T - 1, 1]
    q, *rest = attention_inputs(G * D + S, B, K, G, D, S, T, cache_lengths, buffer_lengths)
    args = ((q.astype(jnp.float32) * peak).astype(jnp.bfloat16), *rest)
    out = np.asarray(jax.jit(buffered_decode_attention)(*args))
    # A probability that rounds to the other bfloat16 neighbour moves an output by ~2^-9 of one value's share.
    np.testing.assert_allclose(out, float64_attention(*args), rtol=0, atol=2e-3)
    q = args[0].astype(jnp.float32).reshape(B, 1, K * G, D)
    xla = jax.jit(decode_attention)(q, args[1], args[2], args[3], args[4:])
    np.testing.assert_allclose(out.reshape(B, 1, K * G * D), np.asarray(xla), rtol=0, atol=2e-5)


@pytest.mark.skipif(attention_simd() != "avx512", reason="only a CPU with AVX-512 runs both lane codes")
@pytest.mark.parametrize("G,D", [(7, 64), (9, 32)])
@pytest.mark.parametrize("peak", [1.0, 16.0])
def test_the_avx2_lane_code_gives_the_avx512_bits(G, D, peak):
    """The same operations lane by lane and the same reductions (kernels/simd16.h): bit for bit, underflowing
    probabilities included."""
    B, K, S, T = 5, 2, 384, 16
    q, *rest = attention_inputs(G + D, B, K, G, D, S, T, [0, S // 2, S, 7, S - 1], [1, T, 2, T - 1, 1])
    args = ((q.astype(jnp.float32) * peak).astype(jnp.bfloat16), *rest)
    run = jax.jit(buffered_decode_attention, static_argnames="simd")
    avx512, avx2 = np.asarray(run(*args, simd="avx512")), np.asarray(run(*args, simd="avx2"))
    np.testing.assert_array_equal(avx2.view(np.uint32), avx512.view(np.uint32))


@needs_kernel
def test_decode_calls_on_the_kernel_generate_what_xlas_attention_generates(tmp_path):
    """bfloat16 decode weights (a buffered bfloat16 cache), rows of three lengths, greedy, three calls of 8 steps:
    the same tokens with and without the kernel, logits within float32 rounding."""
    model = load_model(str(tiny_chat_model(tmp_path / "model")))
    cfg = model.cfg
    params = decode_layout(model.params, jnp.bfloat16)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (10, 40, 23)]
    rows = prefilled_rows(params, cfg, prompts, 128, 24, cache_dtype(params), pad_id=0)

    def decode(kernel):
        out = jax.tree.map(jnp.copy, rows)
        for _ in range(3):
            out, *_ = decode_chunk(params, out, None, None, jnp.zeros(3, jnp.int32), cfg=cfg,
                                   sampling=SamplingConfig(max_new_tokens=24), stop_ids=(), pad_id=0, steps=8,
                                   attention_kernel=kernel)
        return out

    xla, kernel = decode(False), decode(True)
    np.testing.assert_array_equal(np.asarray(kernel.out), np.asarray(xla.out))
    np.testing.assert_allclose(np.asarray(kernel.logits), np.asarray(xla.logits), rtol=0, atol=1e-4)
