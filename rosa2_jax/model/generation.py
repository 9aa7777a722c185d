"""Batched generation with a KV cache: one prefill, then an on-device decode loop.

Rows are left-padded to a static length bucket so that a multi-turn sweep compiles a handful of
programs, not one per turn. Every row samples with its own PRNG key (derived from its seed), so a
row's tokens do not depend on which other rows share the batch or how the batch is sharded.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int

from rosa2_jax.errors import ContextOverflowError
from rosa2_jax.kernels import on_one_device
from rosa2_jax.kernels.decode_attention import attention_kernel_supported
from rosa2_jax.kernels.top_k import top_k
from rosa2_jax.kernels.lora_matmul import kernel_supported
from rosa2_jax.model.config import ModelConfig
from rosa2_jax.model.decoder import (PACKINGS, KVCache, Params, cache_is_buffered, decoder_hidden, lm_logits,
                                     matmul_packing, positions_from_valid)
from rosa2_jax.model.lora import LoraAdapters, take_sessions
from rosa2_jax.model.sharding import shard_batch

# Powers of two, with a midpoint above 128, so that padding wastes at most a third of a row.
PROMPT_BUCKETS = (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 32768)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling settings {self}: need temperature >= 0, 0 < top_p <= 1, top_k >= 0")


@dataclasses.dataclass(frozen=True)
class Generation:
    tokens: list[int]  # generated ids, up to and including the stop token
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int


def bucket_length(n: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
    for b in buckets:
        if n <= b:
            return b
    return int(2 ** np.ceil(np.log2(n)))


# How a sampled token is drawn, recorded with every run (config.json): "nucleus-candidates-per-row" draws among the
# top TOP_P_CANDIDATES logits whenever they hold the row's whole nucleus (top-p) or top-k set, and that row over the
# whole vocabulary otherwise. Same distribution as a draw over the whole masked vocabulary, different random draws
# (the first study, results/qwen05-gsm8k-k5, drew over the whole vocabulary: "full-vocabulary"; "nucleus-candidates",
# 41b8a06 and earlier, drew every row of a step over the whole vocabulary when one row's nucleus was longer).
SAMPLER = "nucleus-candidates-per-row"
TOP_P_CANDIDATES = 256


def decode_path(decode_dtype, mesh: jax.sharding.Mesh | None = None) -> str:
    """How a decode step computes with these decode weights on `mesh`, recorded beside SAMPLER: the same settings give
    the same trajectories only on the same path, since a float32 sum in another order rounds otherwise.
    "flat-matmuls-fitted-cache": every matmul over [rows, in] (decoder._linear) and the token engine's cache sized
    to its rows' tokens (engine/rows.py); the runs before it: "turn-sized-cache". "bfloat16-cache": bfloat16 decode
    weights keep the token engine's cache in bfloat16, written once per decode call (decode_rows.decode_chunk);
    float32 weights compute as "flat-matmuls-fitted-cache" did. "-amx": on one device of a CPU with AMX, the matmuls
    on weights packed into tiles (kernels/amx_matmul.py), bit for bit XLA's sums except in a one-row matmul.
    "-fma-matmul": on one device of a CPU with AVX-512 or AVX2 but no AMX, the matmuls on weights packed into panels
    (kernels/fma_matmul.py), each output's float32 sum in depth order, another order than XLA's (before it, such a
    CPU decoded with XLA's matmul). "-attention": on one device of a CPU with AVX-512 or AVX2, the token engine's
    attention over its bfloat16 cache by kernels/decode_attention.py, its float32 sums in another order than XLA's,
    the same on either instruction set (before kernels/simd16.h, an AVX2 CPU decoded without it). "-grouped-": a
    prefill's attention over the rows of `decoder.group_rows` (its dots sum in another order than before; the paths
    without it are those of 845bb70 and earlier). "-prompt-sized-prefill": the token engine prefills on a one-row
    cache sized to the prompt (decode_rows.prefill_row), so an extending prefill's sums do not depend on the rows'
    capacity (the paths ending "-grouped-prefill" are those of 0420417 and earlier). "-kept-layers": across a
    Weights step the token engine keeps a session's cache in the layers below the adapted ones and computes the
    adapted layers again from the step's inputs to them, and a prefill piece after a prefix attends over the slots
    up to its own end (bucketed) rather than the prompt's whole extent (the paths without it are those of 86d0eb9
    and earlier). "-query-blocks": a prefill's attention runs its queries in blocks (decoder.causal_attention,
    prefix_attention), sums its values in float32 and takes one softmax over a prefix and a piece without
    concatenating them (the paths without it are those of a063350 and earlier; 93a0b42, whose blocks summed the
    values in bfloat16, recorded no run). "-full-calls": a decode call over a bfloat16 cache runs all its steps
    while a row runs (decode_rows.decode_chunk), so a row's sums do not depend on its batch-mates' stops (the paths
    without it are those of 41b8a06 and earlier)."""
    if not cache_is_buffered(decode_dtype):
        return "flat-matmuls-fitted-cache-grouped-prompt-sized-prefill-kept-layers-query-blocks"
    packing = matmul_packing() if on_one_device(mesh) else None
    return ("bfloat16-cache-full-calls-grouped-prompt-sized-prefill-kept-layers-query-blocks"
            + (PACKINGS[packing].path if packing else "")
            + ("-attention" if attention_kernel_supported(mesh) else ""))


def sample_logits(logits: Float[Array, "B V"], keys: jax.Array, sampling: SamplingConfig,
                  greedy: Bool[Array, "B"] | None = None, *, top_k_kernel: bool = False) -> Int[Array, "B"]:
    """Greedy, or temperature / top-k / top-p sampling with one key per row; rows in `greedy` take their argmax
    whatever the config (a text model's request beside sampled turns), and the other rows' draws do not change.

    A filtered draw (top-p < 1, or 0 < top-k <= TOP_P_CANDIDATES) is made among the TOP_P_CANDIDATES largest
    logits: the filter keeps nothing outside them whenever the nucleus is shorter, so the draw has the same
    distribution as one over the whole masked vocabulary, at a small part of its cost (Gumbel noise, the argmax
    and the sort over 152k logits per row were half of a 0.5B decode step). A step in which some row's nucleus is
    longer draws that row over the whole vocabulary (the others still among their candidates: a row's token
    depends on its own logits and key only). With `top_k_kernel` the candidates come from the CPU kernel
    (kernels/top_k.py), which returns lax.top_k's values and indices bit for bit."""
    if sampling.temperature == 0.0:
        return first_max(logits)
    raw, logits = logits, logits / sampling.temperature
    filtered = sampling.top_p < 1.0 or sampling.top_k > 0
    if not filtered or logits.shape[-1] <= TOP_P_CANDIDATES or sampling.top_k > TOP_P_CANDIDATES:
        drawn = _sample_whole_vocabulary(logits, keys, sampling)
        return drawn if greedy is None else jnp.where(greedy, first_max(raw), drawn)
    # The barrier keeps XLA CPU from moving the top-k into the branches below, where it became a full sort
    # (385 ms instead of 5 for 16 rows of 152k logits). `logits` rides along so that XLA does not fold the barrier's
    # tuple into the top-k's own, which its top-k decomposer then fails a check on.
    if top_k_kernel:
        top, ids = top_k(logits, TOP_P_CANDIDATES)
    else:
        top, ids, logits = jax.lax.optimization_barrier((*jax.lax.top_k(logits, TOP_P_CANDIDATES), logits))
    keep = jnp.ones(top.shape, bool)
    if sampling.top_k > 0:
        keep = jnp.arange(TOP_P_CANDIDATES) < sampling.top_k
        top = jnp.where(keep, top, -jnp.inf)
    open_ended = jnp.zeros(top.shape[0], bool)
    if sampling.top_p < 1.0:
        cutoff, open_ended = _nucleus_cutoff(top, _log_total(logits if sampling.top_k == 0 else top), sampling.top_p)
        # A tie at the cutoff may reach past the candidates: then so may the nucleus.
        open_ended = open_ended | (cutoff[:, 0] == top[:, -1])
        keep = keep & (top >= cutoff)

    def among_candidates():
        choice = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, top, -jnp.inf))
        return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    # Each row draws by its own nucleus, so that its token does not depend on its batch-mates' logits.
    drawn = jax.lax.cond(jnp.any(open_ended),
                         lambda: jnp.where(open_ended, _sample_whole_vocabulary(logits, keys, sampling),
                                           among_candidates()),
                         among_candidates)
    if greedy is None:
        return drawn
    # The argmax is among the candidates; it is taken over the unscaled logits (dividing by the temperature can
    # round two neighbours to one value), and top_k puts the lower index first among equal values.
    best = first_max(jnp.take_along_axis(raw, ids, axis=-1))
    return jnp.where(greedy, jnp.take_along_axis(ids, best[:, None], axis=-1)[:, 0].astype(jnp.int32), drawn)


def first_max(logits: Float[Array, "B V"]) -> Int[Array, "B"]:
    """jnp.argmax over the last axis (the first index of the row's largest value, or of its first NaN), as two
    plain reductions: XLA CPU runs argmax's paired (value, index) reduction unvectorised, 8 ms for 16 rows of 152k
    logits against about 1."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    at_top = (logits == top) | jnp.isnan(logits)
    return jnp.min(jnp.where(at_top, jnp.arange(logits.shape[-1], dtype=jnp.int32), logits.shape[-1]), axis=-1)


def _sample_whole_vocabulary(logits: Float[Array, "B V"], keys: jax.Array, sampling: SamplingConfig) -> Int[Array, "B"]:
    """The reference draw: every filter as a mask over the whole vocabulary, Gumbel noise on every logit."""
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        logits = jnp.where(logits < top_p_cutoff(logits, sampling.top_p), -jnp.inf, logits)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def _log_total(logits: Float[Array, "B V"]) -> tuple[Float[Array, "B 1"], Float[Array, "B 1"]]:
    """(row max, sum of exp(logit - max)): the normaliser of each row's distribution."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    return m, jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True)


def _nucleus_cutoff(sorted_logits: Float[Array, "B C"], log_total, top_p: float):
    """(the smallest logit of each row's nucleus among these descending logits [B, 1], whether the nucleus
    reaches past them [B]): the shortest run of most likely tokens whose mass reaches `top_p`."""
    m, total = log_total
    probs = jnp.exp(sorted_logits - m) / total
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    return jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True), keep[:, -1]


def top_p_cutoff(logits: Float[Array, "B V"], top_p: float) -> Float[Array, "B 1"]:
    """The smallest logit of each row's nucleus: the shortest run of most likely tokens whose mass reaches
    `top_p` (at least the top token). It is found among the `TOP_P_CANDIDATES` largest logits, and by a sort
    of the whole vocabulary only when some row's nucleus is longer: on CPU that sort (152k entries x 8 rows)
    costs about as much as the 0.5B model's decode step, the top-k about 1% of it."""
    log_total = _log_total(logits)

    def whole_vocabulary():
        return _nucleus_cutoff(jnp.sort(logits, axis=-1)[:, ::-1], log_total, top_p)[0]

    if logits.shape[-1] <= TOP_P_CANDIDATES:
        return whole_vocabulary()
    fast, open_ended = _nucleus_cutoff(jax.lax.top_k(logits, TOP_P_CANDIDATES)[0], log_total, top_p)
    return jax.lax.cond(jnp.any(open_ended), whole_vocabulary, lambda: fast)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "stop_ids", "pad_id", "lora_kernel"))
def generate_padded(
    params: Params,
    tokens: Int[Array, "B P"],
    valid: Bool[Array, "B P"],
    keys: jax.Array,
    adapters: LoraAdapters | None,
    hidden_offset: Float[Array, "B d"] | None,
    *,
    cfg: ModelConfig,
    sampling: SamplingConfig,
    stop_ids: tuple[int, ...],
    pad_id: int,
    lora_kernel: bool = False,
) -> tuple[Int[Array, "B N"], Int[Array, "B"], Bool[Array, "B"]]:
    """Decode up to N = sampling.max_new_tokens tokens for left-padded prompts.

    `hidden_offset` (the ROSA "HS" adapter) is added to the final hidden state of every position that
    predicts a response token. Returns (tokens [B, N] padded with pad_id, number generated [B], stopped [B]).
    """
    B, P = tokens.shape
    N = sampling.max_new_tokens
    dtype = params["embed"].dtype
    cache = KVCache.empty(cfg, B, P + N, dtype)
    positions = positions_from_valid(valid)
    hidden, cache = decoder_hidden(params, tokens, positions, valid, cfg=cfg, cache=cache, cache_index=0,
                                   adapters=adapters, lora_kernel=lora_kernel)
    offset = 0.0 if hidden_offset is None else hidden_offset.astype(hidden.dtype)
    logits = lm_logits(params, hidden[:, -1] + offset, cfg)
    next_pos = positions[:, -1] + 1
    stop = jnp.asarray(stop_ids, jnp.int32)
    ones = jnp.ones((B, 1), bool)

    def cond(state):
        step, _, _, _, done, _ = state
        return (step < N) & ~jnp.all(done)

    def body(state):
        step, logits, cache, out, done, count = state
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        tok = jnp.where(done, pad_id, sample_logits(logits, step_keys, sampling))
        out = out.at[:, step].set(tok)
        count = jnp.where(done, count, step + 1)
        done = done | jnp.isin(tok, stop)
        hidden, cache = decoder_hidden(
            params, tok[:, None], (next_pos + step)[:, None], ones,
            cfg=cfg, cache=cache, cache_index=P + step, adapters=adapters, lora_kernel=lora_kernel,
        )
        return step + 1, lm_logits(params, hidden[:, 0] + offset, cfg), cache, out, done, count

    init = (
        jnp.int32(0), logits, cache, jnp.full((B, N), pad_id, jnp.int32),
        jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32),
    )
    _, _, _, out, done, count = jax.lax.while_loop(cond, body, init)
    return out, count, done


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, length - len(p):] = p
            valid[i, length - len(p):] = True
    return tokens, valid


# Most bytes of prefill attention scores ([rows, heads, length, length] float32) one generate call holds: a larger
# batch of long prompts is decoded in several calls (64 Words prompts of ~2k tokens asked for 30 GB at once).
PREFILL_SCORE_BYTES = 2 * 2**30


def generate(
    params: Params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    *,
    stop_token_ids: Sequence[int],
    pad_id: int,
    seeds: Sequence[int] | None = None,
    adapters: LoraAdapters | None = None,
    hidden_offset: Float[Array, "B d"] | None = None,
    mesh: Mesh | None = None,
) -> list[Generation]:
    """Generate a continuation for each prompt (token ids). Row i samples with seed `seeds[i]`.

    With `mesh`, rows are split over its `data` axis (params and adapters should already be placed on
    it); the number of prompts should then be a multiple of the `data` size, or rows are replicated.
    """
    if not prompts:
        return []
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    if longest + sampling.max_new_tokens > cfg.max_position_embeddings:
        raise ContextOverflowError(
            f"a prompt of {longest} tokens plus max_new_tokens={sampling.max_new_tokens} exceeds the model's "
            f"context window of {cfg.max_position_embeddings}; shorten the history or lower max_new_tokens."
        )
    length = min(bucket_length(longest), cfg.max_position_embeddings - sampling.max_new_tokens)
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    data = mesh.shape.get("data", 1) if mesh is not None else 1
    per_call = max(data, PREFILL_SCORE_BYTES // (4 * cfg.num_heads * length * length) // data * data)
    if len(prompts) > per_call:  # the prefill's attention scores of every row would not fit: a few calls
        calls = [np.arange(start, min(start + per_call, len(prompts))) for start in range(0, len(prompts), per_call)]
        return [g for rows in calls for g in generate(
            params, cfg, [prompts[i] for i in rows], sampling, stop_token_ids=stop_token_ids, pad_id=pad_id,
            seeds=[seeds[i] for i in rows], adapters=None if adapters is None else take_sessions(adapters, rows),
            hidden_offset=None if hidden_offset is None else hidden_offset[rows], mesh=mesh)]
    tokens, valid = left_pad(prompts, length, pad_id)
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    tokens, valid, keys, hidden_offset = shard_batch((tokens, valid, keys, hidden_offset), mesh)
    out, count, done = generate_padded(
        params, jnp.asarray(tokens), jnp.asarray(valid), keys, adapters, hidden_offset,
        cfg=cfg, sampling=sampling, stop_ids=tuple(sorted(set(stop_token_ids))), pad_id=pad_id,
        lora_kernel=adapters is not None and kernel_supported(mesh),
    )
    out, count, done = jax.device_get((out, count, done))
    return [
        Generation(tokens=out[i, : count[i]].tolist(), finish_reason="stop" if done[i] else "length",
                   prompt_tokens=len(prompts[i]))
        for i in range(len(prompts))
    ]
