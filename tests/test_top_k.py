"""The top-k kernel (kernels/top_k.py) against jax.lax.top_k, bit for bit, and sampled decode calls that take their
candidates from it against those that take them from XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_chat_model
from experiments.common import prefilled_rows
from rosa2_jax.checkpoint import load_model
from rosa2_jax.kernels.top_k import top_k, top_k_ready, top_k_simd
from rosa2_jax.model.decode_rows import decode_chunk
from rosa2_jax.model.decoder import cache_dtype, decode_layout
from rosa2_jax.model.generation import TOP_P_CANDIDATES, SamplingConfig, sample_logits

needs_kernel = pytest.mark.skipif(not top_k_ready(), reason="this CPU has no AVX2 (or no C++ compiler)")


def awkward_rows(V: int, seed: int) -> np.ndarray:
    """Rows of logits with what an order can get wrong: runs of equal values, ±0, ±inf, NaN of both signs, a row
    of one value, a row whose largest entries all sit in one block."""
    rng = np.random.default_rng(seed)
    x = (3 * rng.normal(size=(6, V))).astype(np.float32)
    x[0, rng.integers(0, V, V // 3)] = 1.5  # many ties above most values
    x[1, :8] = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 0.0, -0.0]
    x[1, rng.integers(8, V, 5)] = np.inf
    x[2] = 0.25
    x[3, 40:40 + min(300, V - 40)] = 50.0 + np.arange(min(300, V - 40), dtype=np.float32) % 7
    x[4] = np.round(x[4])  # a few distinct values, each many times
    return x


@needs_kernel
@pytest.mark.parametrize("V,k", [(151936, TOP_P_CANDIDATES), (151936, 1), (1000, 256), (300, 256), (257, 257),
                                 (40, 3)])
def test_kernel_returns_lax_top_k_bit_for_bit(V, k):
    """On every lane code this CPU runs (AVX2, and AVX-512 where it has it)."""
    x = jnp.asarray(awkward_rows(V, V + k))
    want_values, want_indices = jax.lax.top_k(x, k)
    for simd in ("avx2", "avx512")[:1 + (top_k_simd() == "avx512")]:
        values, indices = jax.jit(top_k, static_argnums=1, static_argnames="simd")(x, k, simd=simd)
        np.testing.assert_array_equal(np.asarray(indices), np.asarray(want_indices))
        np.testing.assert_array_equal(np.asarray(values).view(np.uint32), np.asarray(want_values).view(np.uint32))


@needs_kernel
@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=0.7, top_p=0.8),
                                      SamplingConfig(temperature=1.0, top_k=50),
                                      SamplingConfig(temperature=0.7, top_p=0.95, top_k=200)])
def test_the_sampler_draws_the_same_tokens_among_the_kernels_candidates(sampling):
    """16 rows of a 152k vocabulary whose nuclei lie within the 256 candidates, 64 draws each, greedy rows beside."""
    logits = jnp.asarray(np.random.default_rng(5).normal(size=(16, 151936)) * 4, jnp.float32)
    greedy = jnp.arange(16) % 5 == 0
    draw = jax.jit(lambda logits, keys, kernel: sample_logits(logits, keys, sampling, greedy, top_k_kernel=kernel),
                   static_argnums=2)
    for step in range(64):
        keys = jax.random.split(jax.random.key(step), 16)
        np.testing.assert_array_equal(np.asarray(draw(logits, keys, True)), np.asarray(draw(logits, keys, False)))


@needs_kernel
def test_sampled_decode_calls_draw_the_same_tokens_with_the_kernel(tmp_path):
    """Temperature 0.7, top-p 0.8, three rows over three calls: the candidates from the kernel give the tokens XLA's
    top-k gives (the tiny model's 262-token vocabulary is just above the 256 candidates)."""
    model = load_model(str(tiny_chat_model(tmp_path / "model")))
    cfg = model.cfg
    assert cfg.vocab_size > TOP_P_CANDIDATES
    params = decode_layout(model.params, jnp.bfloat16)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (12, 30, 21)]
    rows = prefilled_rows(params, cfg, prompts, 128, 24, cache_dtype(params), pad_id=0)
    sampling = SamplingConfig(max_new_tokens=24, temperature=0.7, top_p=0.8)

    def decode(kernel):
        out = jax.tree.map(jnp.copy, rows)
        for _ in range(3):
            out, *_ = decode_chunk(params, out, None, None, jnp.zeros(3, jnp.int32), cfg=cfg, sampling=sampling,
                                   stop_ids=(), pad_id=0, steps=8, top_k_kernel=kernel)
        return out

    xla, kernel = decode(False), decode(True)
    np.testing.assert_array_equal(np.asarray(kernel.out), np.asarray(xla.out))
    np.testing.assert_array_equal(np.asarray(kernel.logits), np.asarray(xla.logits))
