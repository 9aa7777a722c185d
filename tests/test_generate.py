"""KV-cached generation against the full forward and against HF `generate`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rosa2_jax.checkpoint.hf_folder import load_hf_folder
from rosa2_jax.errors import ContextOverflowError
from rosa2_jax.kernels.amx_matmul import amx_ready
from rosa2_jax.kernels.fma_matmul import fma_matmul_simd
from rosa2_jax.model.decoder import KVCache, decode_layout, decoder_hidden, forward, lm_logits, positions_from_valid
from rosa2_jax.model.generation import (TOP_P_CANDIDATES, SamplingConfig, _sample_whole_vocabulary, first_max,
                                        generate, left_pad, sample_logits, top_p_cutoff)

PROMPT_LENGTHS = (5, 13, 2)


@pytest.fixture(scope="module")
def tiny(tiny_hf):
    kind, model, folder = tiny_hf
    cfg, params = load_hf_folder(folder)
    return kind, model, cfg, jax.tree.map(jnp.asarray, params)


def _prompts(vocab, seed=0):
    r = np.random.RandomState(seed)
    return [r.randint(3, vocab, n).tolist() for n in PROMPT_LENGTHS]


LAYOUTS = {"stacked": lambda p: p, "per-layer": lambda p: decode_layout(p, out_in=False),
           "per-layer-out-in": lambda p: decode_layout(p, out_in=True)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cached_decoding_equals_full_forward_at_every_step(tiny, layout):
    """Every layout generation may run on (stacked weights, decode_layout's per-layer [in, out] of accelerators
    and [out, in] of CPUs) decodes the logits of the teacher-forced forward over the stacked weights."""
    _, _, cfg, stacked = tiny
    params = LAYOUTS[layout](stacked)
    prompts = _prompts(cfg.vocab_size)
    P, steps = 16, 6
    tokens, valid = left_pad(prompts, P, pad_id=0)
    tokens, valid = jnp.asarray(tokens), jnp.asarray(valid)
    cache = KVCache.empty(cfg, len(prompts), P + steps, jnp.float32)
    positions = positions_from_valid(valid)
    hidden, cache = decoder_hidden(params, tokens, positions, valid, cfg=cfg, cache=cache, cache_index=0)
    step_logits = lm_logits(params, hidden[:, -1], cfg)
    seq, seq_valid = tokens, valid
    for step in range(steps):
        full = forward(stacked, seq, seq_valid, cfg=cfg)[:, -1]
        np.testing.assert_allclose(step_logits, full, atol=1e-4, rtol=0, err_msg=f"step {step}")
        nxt = jnp.argmax(step_logits, -1).astype(jnp.int32)
        seq = jnp.concatenate([seq, nxt[:, None]], 1)
        seq_valid = jnp.concatenate([seq_valid, jnp.ones((len(prompts), 1), bool)], 1)
        hidden, cache = decoder_hidden(params, nxt[:, None], positions[:, -1:] + 1 + step,
                                       jnp.ones((len(prompts), 1), bool), cfg=cfg, cache=cache, cache_index=P + step)
        step_logits = lm_logits(params, hidden[:, 0], cfg)


def test_a_turn_prefilled_onto_its_cached_history_equals_a_full_prefill(tiny):
    """Prefix reuse: the next turn's tokens prefilled after the cached history (rows of different history
    lengths, left-padded) give the logits of prefilling [history ; turn] from scratch, and decoding
    continues from that cache as from the full one."""
    _, _, cfg, params = tiny
    histories = _prompts(cfg.vocab_size)
    turn = np.random.RandomState(1).randint(3, cfg.vocab_size, (len(histories), 7)).astype(np.int32)
    P, T, steps = 16, turn.shape[1], 3
    tokens, valid = (jnp.asarray(a) for a in left_pad(histories, P, pad_id=0))
    positions = positions_from_valid(valid)
    cache = KVCache.empty(cfg, len(histories), P + T + steps, jnp.float32)
    _, cache = decoder_hidden(params, tokens, positions, valid, cfg=cfg, cache=cache, cache_index=0)
    turn_positions = positions[:, -1:] + 1 + jnp.arange(T)[None]
    hidden, cache = decoder_hidden(params, jnp.asarray(turn), turn_positions, jnp.ones(turn.shape, bool), cfg=cfg,
                                   cache=cache, cache_index=P, continue_prefix=True)
    full_tokens = jnp.concatenate([tokens, jnp.asarray(turn)], 1)
    full_valid = jnp.concatenate([valid, jnp.ones(turn.shape, bool)], 1)
    full = forward(params, full_tokens, full_valid, cfg=cfg)
    np.testing.assert_allclose(lm_logits(params, hidden, cfg), full[:, P:], atol=1e-5, rtol=0)
    logits = lm_logits(params, hidden[:, -1], cfg)
    for step in range(steps):
        nxt = jnp.argmax(logits, -1).astype(jnp.int32)
        full_tokens = jnp.concatenate([full_tokens, nxt[:, None]], 1)
        full_valid = jnp.concatenate([full_valid, jnp.ones((len(histories), 1), bool)], 1)
        hidden, cache = decoder_hidden(params, nxt[:, None], turn_positions[:, -1:] + 1 + step,
                                       jnp.ones((len(histories), 1), bool), cfg=cfg, cache=cache,
                                       cache_index=P + T + step)
        logits = lm_logits(params, hidden[:, 0], cfg)
        np.testing.assert_allclose(logits, forward(params, full_tokens, full_valid, cfg=cfg)[:, -1], atol=1e-5,
                                   rtol=0, err_msg=f"step {step}")


def _hf_greedy(model, prompt, max_new, eos):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_tokens_equal_hf_generate(tiny):
    kind, model, cfg, params = tiny
    prompts = _prompts(cfg.vocab_size, seed=1)
    max_new = 10
    # Pick as stop token one that HF's greedy run of row 0 emits mid-way, so stopping is exercised.
    free_run = _hf_greedy(model, prompts[0], max_new, eos=None)
    eos = free_run[3]
    ours = generate(params, cfg, prompts, SamplingConfig(max_new_tokens=max_new), stop_token_ids=[eos], pad_id=0)
    for i, prompt in enumerate(prompts):
        ref = _hf_greedy(model, prompt, max_new, eos=eos)
        if ref[-1] == 0 and eos != 0:
            ref = ref[: ref.index(eos) + 1]  # HF pads a finished row; ours stops there
        assert ours[i].tokens == ref, f"{kind} row {i}"
        assert ours[i].finish_reason == ("stop" if eos in ref else "length")
    assert ours[0].finish_reason == "stop" and ours[0].tokens[-1] == eos


def test_rows_sample_independently_of_batch_composition(tiny):
    _, _, cfg, params = tiny
    prompts = _prompts(cfg.vocab_size, seed=2)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=20)
    batch = generate(params, cfg, prompts, sampling, stop_token_ids=[], pad_id=0, seeds=[11, 12, 13])
    alone = generate(params, cfg, prompts[1:2], sampling, stop_token_ids=[], pad_id=0, seeds=[12])
    assert batch[1].tokens == alone[0].tokens
    other_seed = generate(params, cfg, prompts[1:2], sampling, stop_token_ids=[], pad_id=0, seeds=[99])
    assert len(other_seed[0].tokens) == 8


def test_a_batch_too_large_for_one_prefill_is_decoded_in_several_calls(tiny, monkeypatch):
    """Rows whose prefill attention scores exceed the budget go in several calls, each row as in one call."""
    import rosa2_jax.model.generation as generation

    _, _, cfg, params = tiny
    prompts = _prompts(cfg.vocab_size, seed=3) * 2
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=0.9)
    whole = generate(params, cfg, prompts, sampling, stop_token_ids=[], pad_id=0, seeds=list(range(6)))
    calls = []
    real = generation.generate_padded
    monkeypatch.setattr(generation, "generate_padded", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    length = generation.bucket_length(max(PROMPT_LENGTHS))
    monkeypatch.setattr(generation, "PREFILL_SCORE_BYTES", 4 * cfg.num_heads * length * length * 4)  # 4 rows
    split = generate(params, cfg, prompts, sampling, stop_token_ids=[], pad_id=0, seeds=list(range(6)))
    assert calls == [4, 2]
    assert [g.tokens for g in split] == [g.tokens for g in whole]


def test_sampling_filters_respect_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.split(jax.random.key(0), 4000)
    top_p = np.asarray(sample_logits(logits, keys, SamplingConfig(temperature=1.0, top_p=0.75)))
    assert set(np.unique(top_p)) == {0, 1}  # 0.5 + 0.3 reaches 0.75; tokens 2, 3 are cut
    assert abs(np.mean(top_p == 0) - 0.5 / 0.8) < 0.03
    top_k = np.asarray(sample_logits(logits, keys, SamplingConfig(temperature=1.0, top_k=3)))
    assert set(np.unique(top_k)) == {0, 1, 2}
    greedy = sample_logits(logits[:2], keys[:2], SamplingConfig(temperature=0.0))
    assert greedy.tolist() == [0, 0]
    full = np.asarray(sample_logits(logits, keys, SamplingConfig(temperature=1.0)))
    np.testing.assert_allclose(np.bincount(full, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_bfloat16_decode_weights_stay_close_to_float32(tiny):
    """decode_layout(bfloat16): matmul weights rounded to bfloat16, float32 accumulation and residual stream. The
    greedy continuation and the logits stay close to float32's (the 0.5B built-in's figures are in BUILD_NOTES)."""
    _, _, cfg, params = tiny
    prompts = _prompts(cfg.vocab_size)
    greedy = SamplingConfig(max_new_tokens=6)
    f32 = generate(decode_layout(params), cfg, prompts, greedy, stop_token_ids=[], pad_id=0)
    bf16 = generate(decode_layout(params, jnp.bfloat16), cfg, prompts, greedy, stop_token_ids=[], pad_id=0)
    tokens, valid = (jnp.asarray(a) for a in left_pad(prompts, 16, pad_id=0))
    cache = KVCache.empty(cfg, len(prompts), 16, jnp.float32)
    logits = {name: lm_logits(p, decoder_hidden(p, tokens, positions_from_valid(valid), valid, cfg=cfg,
                                                  cache=cache)[0][:, -1], cfg)
              for name, p in (("f32", decode_layout(params)), ("bf16", decode_layout(params, jnp.bfloat16)))}
    assert logits["bf16"].dtype == jnp.float32
    error = np.abs(np.asarray(logits["bf16"] - logits["f32"])).max()
    assert 0 < error < 0.02 * np.abs(np.asarray(logits["f32"])).max()
    assert sum(a.tokens == b.tokens for a, b in zip(f32, bf16)) >= len(prompts) - 1


@pytest.mark.parametrize("pack", [
    pytest.param("tiles", marks=pytest.mark.skipif(not amx_ready(), reason="no AMX-BF16 here (or no g++)")),
    pytest.param("panels", marks=pytest.mark.skipif(fma_matmul_simd() is None, reason="no AVX2 here (or no g++)")),
])
def test_decoding_on_packed_weights_gives_the_logits_and_tokens_of_xlas_matmul(tiny, pack):
    """decode_layout's weights packed for a CPU matmul kernel (AMX tiles, FMA panels) against the same bfloat16
    weights on XLA's matmul."""
    _, _, cfg, params = tiny
    packed = decode_layout(params, jnp.bfloat16, pack=pack)
    plain = decode_layout(params, jnp.bfloat16, pack=None)
    assert any(name.endswith(f"_{pack}") for name in packed["layers"][0])  # the head too, where V % 16 == 0
    assert not any(name.endswith(f"_{pack}") for name in plain["layers"][0])
    ids = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 24)))
    valid = jnp.ones(ids.shape, bool)
    logits = [lm_logits(p, decoder_hidden(p, ids, positions_from_valid(valid), valid, cfg=cfg)[0], cfg)
              for p in (packed, plain)]
    np.testing.assert_allclose(logits[0], logits[1], rtol=0, atol=1e-4 * float(jnp.abs(logits[1]).max()))
    prompts = [list(map(int, row)) for row in ids[:, :12]]
    greedy = SamplingConfig(max_new_tokens=16, temperature=0.0)
    runs = [generate(p, cfg, prompts, greedy, stop_token_ids=[], pad_id=0) for p in (packed, plain)]
    assert [g.tokens for g in runs[0]] == [g.tokens for g in runs[1]]


def _chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at p = 0.001 (z of the normal), Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("sampling", [
    SamplingConfig(temperature=0.7, top_p=0.8), SamplingConfig(temperature=1.0, top_k=7),
    SamplingConfig(temperature=1.0, top_k=40, top_p=0.9)], ids=["top-p", "top-k", "top-k-and-top-p"])
def test_draws_among_the_candidates_follow_the_filtered_distribution(sampling):
    """A peaked row of a 1,000-token vocabulary: its filtered set lies among the candidates, and 20,000 draws
    match the float64 filtered distribution (chi-square, p = 0.001) with no token outside it."""
    logits = np.random.default_rng(3).normal(size=1000) * 3.0
    draws = np.asarray(sample_logits(jnp.asarray(np.tile(logits.astype(np.float32), (20000, 1))),
                                     jax.random.split(jax.random.key(1), 20000), sampling))
    scaled = logits / sampling.temperature
    order = np.argsort(-scaled)
    probs = np.exp(scaled[order] - scaled[order][0])
    if sampling.top_k:
        probs[sampling.top_k:] = 0
    probs /= probs.sum()
    keep = np.cumsum(probs) - probs < sampling.top_p
    expected = np.where(keep, probs, 0) / probs[keep].sum()
    assert keep.sum() < TOP_P_CANDIDATES
    counts = np.bincount(np.argsort(order)[draws], minlength=1000)
    assert counts[~keep].sum() == 0
    stat = np.sum((counts[keep] - 20000 * expected[keep]) ** 2 / (20000 * expected[keep]))
    assert stat < _chi_square_critical(int(keep.sum()) - 1)


def test_a_nucleus_longer_than_the_candidates_draws_that_row_over_the_whole_vocabulary():
    """A flat row (a nucleus of ~800 tokens) takes the reference draw, token for token; the peaked rows beside it
    draw what they draw without it, so that a row's token depends on its own logits and key only."""
    rng = np.random.default_rng(4)
    logits = np.concatenate([rng.normal(size=(1, 1000)) * 0.05, rng.normal(size=(31, 1000)) * 1.5]).astype(np.float32)
    keys = jax.random.split(jax.random.key(2), 32)
    sampling = SamplingConfig(temperature=0.7, top_p=0.8)
    drawn = np.asarray(sample_logits(jnp.asarray(logits), keys, sampling))
    reference = np.asarray(_sample_whole_vocabulary(jnp.asarray(logits) / 0.7, keys, sampling))
    assert drawn[0] == reference[0]
    assert np.array_equal(drawn[1:], sample_logits(jnp.asarray(logits[1:]), keys[1:], sampling))
    assert not np.array_equal(drawn[1:], reference[1:])  # the same distribution, other draws


def test_first_max_is_argmax_with_its_ties_and_nans():
    """The vectorised argmax picks what jnp.argmax picks: the first of tied maxima, the first NaN, index 0 of an
    all -inf row."""
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(6, 3000)).astype(np.float32)
    logits[1, [7, 2000]] = logits[1].max() + 1  # a tie
    logits[2, [40, 900]] = np.nan
    logits[3] = -np.inf
    logits[4] = np.round(logits[4])  # many ties
    assert np.array_equal(first_max(jnp.asarray(logits)), np.asarray(jnp.argmax(jnp.asarray(logits), axis=-1)))


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=0.7, top_p=0.8), SamplingConfig(temperature=0.7)],
                         ids=["candidates", "whole-vocabulary"])
def test_greedy_rows_take_their_argmax_and_leave_the_other_draws_alone(sampling):
    """Rows marked greedy (a text model's request beside sampled turns) take jnp.argmax of their logits, even where
    dividing by the temperature ties two neighbours; the other rows draw as they would with no greedy row."""
    rng = np.random.default_rng(6)
    logits = (rng.normal(size=(8, 5000)) * 4).astype(np.float32)
    top = np.float32(22.400009155273438)  # above every other logit of the row
    logits[2, 10], logits[2, 11] = top, np.nextafter(top, np.float32(23))  # 1 ulp apart
    assert logits[2, 10] / np.float32(0.7) == logits[2, 11] / np.float32(0.7)  # ... and one value once scaled
    keys = jax.random.split(jax.random.key(3), 8)
    greedy = jnp.asarray([False, True, True, False, True, False, False, False])
    mixed = np.asarray(sample_logits(jnp.asarray(logits), keys, sampling, greedy))
    alone = np.asarray(sample_logits(jnp.asarray(logits), keys, sampling))
    argmax = np.argmax(logits, axis=-1)
    g = np.asarray(greedy)
    assert np.array_equal(mixed[g], argmax[g]) and mixed[2] == 11
    assert np.array_equal(mixed[~g], alone[~g])


@pytest.mark.parametrize("scale", [8.0, 0.05], ids=["nucleus-among-the-candidates", "nucleus-needs-the-full-sort"])
def test_top_p_cutoff_equals_a_sort_of_the_whole_vocabulary(scale):
    """The nucleus found among the top-k candidates (peaked rows) or by the fallback sort (flat rows, whose
    nucleus is thousands of tokens long) is the one a float64 sort of the whole vocabulary gives."""
    logits = np.random.default_rng(0).normal(size=(4, 151936)).astype(np.float32) * scale
    cutoff = np.asarray(top_p_cutoff(jnp.asarray(logits), 0.8))[:, 0]
    for row, c in zip(logits.astype(np.float64), cutoff):
        ordered = np.sort(row)[::-1]
        probs = np.exp(ordered - ordered[0]) / np.exp(ordered - ordered[0]).sum()
        kept = np.count_nonzero(np.cumsum(probs) - probs < 0.8)
        assert (kept < TOP_P_CANDIDATES) == (scale > 1)
        assert c == ordered[kept - 1]


def test_context_overflow_is_reported(tiny):
    _, _, cfg, params = tiny
    long_prompt = [5] * (cfg.max_position_embeddings - 4)
    with pytest.raises(ContextOverflowError, match="context window"):
        generate(params, cfg, [long_prompt], SamplingConfig(max_new_tokens=8), stop_token_ids=[], pad_id=0)
