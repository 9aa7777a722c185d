"""The decode batch of the token-level engine: B rows, each holding one session's turn, refilled as rows stop.

Unlike `generation.generate_padded` (one left-padded batch from prefill to the last row's stop), every row
here has its own length: a row's tokens sit in cache slots [0, length) with RoPE positions 0..length-1, so a
session's cached history can be put back into any row and only its new tokens prefilled (prefix reuse).

- `prefill_row` puts a session's prompt into one row (after its held prefix, if any): `prefill_tokens` computes it
  on a one-row cache of the prompt's own extent and `start_row` writes that in and leaves the row ready to decode:
  the next-token logits, the turn's PRNG key, count 0, its own token limit and whether it decodes greedily (a text
  model's request, e.g. a Words critique, shares the rows with sampled policy turns).
- `decode_chunk` runs up to `steps` decode steps for every row at once; over a float32 cache it returns after the
  step in which a row stops, so that the host refills it. Row b samples its n-th token of the turn with
  fold_in(key_b, n), as `generate_padded` does, and its sums do not depend on where its batch-mates stop, so a
  session's tokens do not depend on its row or on the other rows, with one exception: over a float32 cache XLA's
  dots over the slots sum in an order set by the rows' capacity (which the longest row sets), so its logits can
  move in the last bits (BUILD_NOTES.md, "The decode step against its roofline", its "Prefill on the prompt's own
  cache").
- `row_cache` holds one row's cache (a session waiting for its update); `fit_row_cache` resizes a held one.
- `resize_rows` changes the cache's slots to what the running turns need.

Shapes: B rows, S cache slots (the capacity), T chunk tokens, N max new tokens, P sessions in the pool.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from rosa2_jax.model.config import ModelConfig
from rosa2_jax.model.decoder import KVCache, Params, cache_dtype, cache_is_buffered, decoder_hidden, lm_logits
from rosa2_jax.model.generation import SamplingConfig, bucket_length, sample_logits
from rosa2_jax.model.lora import LoraAdapters, take_sessions


@struct.dataclass
class DecodeRows:
    cache: KVCache  # per layer k [B, K, D, S] and v [B, K, S, D]; valid [B, S]
    length: Int[Array, "B"]  # tokens in the row's cache: the next slot written and the next RoPE position
    logits: Float[Array, "B V"]  # next-token logits
    keys: jax.Array  # [B] the turn's PRNG key
    count: Int[Array, "B"]  # tokens generated this turn
    limit: Int[Array, "B"]  # the row's max new tokens (at most N)
    greedy: Bool[Array, "B"]  # argmax instead of the sampling config (text-model requests)
    done: Bool[Array, "B"]  # the row's turn has ended (stop token, max_new_tokens) or the row is empty
    out: Int[Array, "B N"]  # this turn's tokens; only the first `count` are meaningful

    @property
    def capacity(self) -> int:
        return self.cache.valid.shape[1]


@struct.dataclass
class RowCache:
    """One row's cache, held while its session waits (verification, Words step)."""

    k: tuple[Float[Array, "K D S"], ...]  # per layer
    v: tuple[Float[Array, "K S D"], ...]
    valid: Bool[Array, "S"]

    @property
    def capacity(self) -> int:
        return self.valid.shape[0]


def empty_rows(cfg: ModelConfig, batch: int, capacity: int, max_new_tokens: int, dtype, pad_id: int) -> DecodeRows:
    return DecodeRows(
        cache=KVCache.empty(cfg, batch, capacity, dtype), length=jnp.zeros((batch,), jnp.int32),
        logits=jnp.zeros((batch, cfg.vocab_size), jnp.float32),
        keys=jax.vmap(jax.random.key)(jnp.zeros((batch,), jnp.uint32)),
        count=jnp.zeros((batch,), jnp.int32), limit=jnp.full((batch,), max_new_tokens, jnp.int32),
        greedy=jnp.zeros((batch,), bool), done=jnp.ones((batch,), bool),
        out=jnp.full((batch, max_new_tokens), pad_id, jnp.int32))


def _fit_slots(x: Array, axis: int, capacity: int) -> Array:
    """Pad with zeros (invalid) or cut the slot axis to `capacity`; the caller keeps valid slots inside."""
    size = x.shape[axis]
    if size >= capacity:
        return jax.lax.slice_in_dim(x, 0, capacity, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, capacity - size)
    return jnp.pad(x, pad)


@functools.partial(jax.jit, static_argnames=("capacity",))
def resize_rows(rows: DecodeRows, capacity: int) -> DecodeRows:
    """The same rows with `capacity` cache slots (every running row's length must fit). Empty rows restart
    at slot 0, since their decode steps write an invalid entry at their length, which must stay inside."""
    c = rows.cache
    return rows.replace(cache=c.map(lambda k: _fit_slots(k, 3, capacity), lambda v: _fit_slots(v, 2, capacity),
                                    _fit_slots(c.valid, 1, capacity)),
                        length=jnp.where(rows.done, 0, rows.length))


@jax.jit
def row_cache(rows: DecodeRows, row: Int[Array, ""]) -> RowCache:
    c = rows.cache
    return RowCache(tuple(k[row] for k in c.k), tuple(v[row] for v in c.v), c.valid[row])


@functools.partial(jax.jit, static_argnames=("capacity",))
def fit_row_cache(saved: RowCache, capacity: int) -> RowCache:
    """A held cache with `capacity` slots (its valid slots must fit)."""
    return RowCache(tuple(_fit_slots(k, 2, capacity) for k in saved.k),
                    tuple(_fit_slots(v, 1, capacity) for v in saved.v), _fit_slots(saved.valid, 0, capacity))


def _session_adapters(adapters: LoraAdapters | None, index: Int[Array, "..."]) -> LoraAdapters | None:
    return None if adapters is None else take_sessions(adapters, index)


def _session_offset(offsets: Float[Array, "P d"] | None, index: Int[Array, "..."], dtype):
    return 0.0 if offsets is None else offsets[index].astype(dtype)


def prefill_row(
    params: Params,
    rows: DecodeRows,
    row: int,
    prompt: Sequence[int],
    key: jax.Array,
    *,
    cfg: ModelConfig,
    pad_id: int,
    prefix: RowCache | None = None,
    reuse: int = 0,
    chunk: int = 512,
    adapters: LoraAdapters | None = None,
    offsets: Float[Array, "P d"] | None = None,
    session: int = 0,
    limit: int | None = None,
    greedy: bool = False,
    lora_kernel: bool = False,
    refresh: Float[Array, "R d"] | None = None,
    first_layer: int = 0,
) -> DecodeRows:
    """Put `prompt` into `row`, ready to decode its turn with `key`, at most `limit` tokens (default N), greedily if
    `greedy` (default: the sampling config); `session` indexes the pool's adapters / offsets.

    The first `reuse` tokens' keys/values come from `prefix` (a held cache holding at least them); the rest is
    prefilled in pieces of at most `chunk` tokens, each padded to a bucket, on a cache of one row sized to the
    prompt's own padded extent, which `start_row` then writes into the row. So a prefill's programs compile per
    (piece, extent), not per the rows' capacity, which the batch-mates set, and its sums do not depend on it
    either (an extending prefill over a 768-slot row and a 1,024-slot one differed by up to 0.03 in a bfloat16
    logit). A piece after a prefix attends over the slots up to its own padded end, bucketed, not over the whole
    extent (a 2,112-token prompt in 512-token pieces: 1.6x faster on the 0.5B). With `refresh` (R >= reuse: the
    residual stream entering `first_layer` at the prefix's tokens, which a Weights step computed) the prefix's
    layers from `first_layer` on are computed again at its first `reuse` slots, in pieces, from those inputs, and
    its layers below are kept: the prefix of a session whose adapter, in those layers only, has changed."""
    if not 0 <= reuse < len(prompt) or (reuse and prefix is None):
        raise ValueError(f"reuse={reuse} of a {len(prompt)}-token prompt: reuse needs a held prefix and must leave at "
                         "least one token to prefill")
    if len(prompt) > rows.capacity:
        raise ValueError(f"a {len(prompt)}-token prompt does not fit rows of {rows.capacity} cache slots: resize them "
                         "first (resize_rows)")
    if refresh is not None and not (0 < first_layer and reuse <= refresh.shape[0]):
        raise ValueError(f"a refresh of {refresh.shape[0]} tokens from layer {first_layer} cannot cover {reuse} reused "
                         "tokens: it needs a first layer above 0 and its inputs at every reused token")
    # (start, tokens, whether the piece refreshes the prefix's adapted layers from `refresh`)
    pieces = [(s, min(chunk, reuse - s), True) for s in range(0, reuse if refresh is not None else 0, chunk)]
    pieces += [(s, min(chunk, len(prompt) - s), False) for s in range(reuse, len(prompt), chunk)]
    extent = bucket_length(max(s + bucket_length(n) for s, n, _ in pieces))
    cache = prefix if reuse else None
    logits = None
    for s, n, refreshing in pieces:
        padded = np.full(bucket_length(n), pad_id, np.int32)
        if not refreshing:
            padded[:n] = prompt[s: s + n]
        if cache is not None and cache.capacity != extent:
            cache = fit_row_cache(cache, capacity=extent)
        cache, logits = prefill_tokens(params, cache, jnp.asarray(padded), jnp.int32(n), jnp.int32(s), adapters,
                                       offsets, jnp.int32(session), refresh if refreshing else None, cfg=cfg,
                                       lora_kernel=lora_kernel, first_layer=first_layer if refreshing else 0,
                                       span=bucket_length(s + bucket_length(n)))
    return start_row(rows, jnp.int32(row), cache, logits, jnp.int32(len(prompt)), key,
                     jnp.int32(rows.out.shape[1] if limit is None else limit), jnp.bool_(greedy))


@functools.partial(jax.jit, static_argnames=("cfg", "lora_kernel", "first_layer", "span"))
def prefill_tokens(
    params: Params,
    prefix: RowCache | None,
    tokens: Int[Array, "T"],
    num_new: Int[Array, ""],
    start: Int[Array, ""],
    adapters: LoraAdapters | None,
    offsets: Float[Array, "P d"] | None,
    session: Int[Array, ""],
    inputs: Float[Array, "R d"] | None = None,
    *,
    cfg: ModelConfig,
    lora_kernel: bool = False,
    first_layer: int = 0,
    span: int | None = None,
) -> tuple[RowCache, Float[Array, "V"]]:
    """tokens[:num_new] prefilled at slots [start, start + num_new) of a one-row cache, attending to its slots below
    `start` (`prefix`, of C >= start + T slots; slots from `start` on are dropped first); without a prefix (start 0)
    to themselves only, into a cache of T slots. Returns the cache and the next-token logits after the last token.

    With `inputs` (R >= start + num_new rows: row r is the residual stream entering `first_layer` at slot r) only
    layers [first_layer, L) run, from inputs[start:], and are written; the prefix's layers below keep their
    keys/values at every slot (a held cache whose adapted layers are refreshed after a Weights step). With `span`
    (start + T <= span <= C) the piece attends over the prefix's first `span` slots only, the ones it can see: the
    prompt's early pieces do not pay for its whole extent."""
    T = tokens.shape[0]
    if prefix is None:
        cache = KVCache.empty(cfg, 1, T, cache_dtype(params))
    else:
        span = span or prefix.capacity
        keep = prefix.valid & (jnp.arange(prefix.capacity) < start)
        cache = KVCache(tuple(k[None, ..., :span] for k in prefix.k), tuple(v[None, :, :span] for v in prefix.v),
                        keep[None, :span])
    row_adapters = _session_adapters(adapters, session[None])
    if inputs is not None:
        piece_inputs = jax.lax.dynamic_slice_in_dim(jnp.pad(inputs, ((0, T), (0, 0))), start, T).astype(
            params["embed"].dtype)
        if row_adapters is not None:  # the layers run
            row_adapters = row_adapters.from_layer(first_layer)
    hidden, cache = decoder_hidden(
        params, tokens[None], (start + jnp.arange(T, dtype=jnp.int32))[None], (jnp.arange(T) < num_new)[None],
        cfg=cfg, cache=cache, cache_index=start, adapters=row_adapters, lora_kernel=lora_kernel,
        continue_prefix=prefix is not None, inputs=None if inputs is None else piece_inputs[None],
        layers=None if inputs is None else (first_layer, cfg.num_layers))
    last = hidden[0, num_new - 1] + _session_offset(offsets, session, hidden.dtype)
    out = RowCache(tuple(k[0] for k in cache.k), tuple(v[0] for v in cache.v), cache.valid[0])
    if prefix is not None and span < prefix.capacity:
        out = RowCache(tuple(p.at[..., :span].set(k) for p, k in zip(prefix.k, out.k)),
                       tuple(p.at[:, :span].set(v) for p, v in zip(prefix.v, out.v)), keep.at[:span].set(out.valid))
    return out, lm_logits(params, last, cfg).astype(jnp.float32)


@functools.partial(jax.jit, donate_argnames=("rows",))
def start_row(
    rows: DecodeRows,
    row: Int[Array, ""],
    cache: RowCache,
    logits: Float[Array, "V"],
    length: Int[Array, ""],
    key: jax.Array,
    limit: Int[Array, ""],
    greedy: Bool[Array, ""],
) -> DecodeRows:
    """`row` holding a prefilled prompt's cache (fitted to the rows' capacity; its `length` tokens must fit), ready
    to decode a turn from `logits`."""
    c, fitted = rows.cache, fit_row_cache(cache, capacity=rows.capacity)
    return rows.replace(
        cache=KVCache(tuple(k.at[row].set(h) for k, h in zip(c.k, fitted.k)),
                      tuple(v.at[row].set(h) for v, h in zip(c.v, fitted.v)), c.valid.at[row].set(fitted.valid)),
        length=rows.length.at[row].set(length), logits=rows.logits.at[row].set(logits),
        keys=rows.keys.at[row].set(key), count=rows.count.at[row].set(0), limit=rows.limit.at[row].set(limit),
        greedy=rows.greedy.at[row].set(greedy), done=rows.done.at[row].set(False))


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "stop_ids", "pad_id", "steps", "lora_kernel",
                                             "attention_kernel", "top_k_kernel"), donate_argnames=("rows",))
def decode_chunk(
    params: Params,
    rows: DecodeRows,
    adapters: LoraAdapters | None,
    offsets: Float[Array, "P d"] | None,
    sessions: Int[Array, "B"],
    *,
    cfg: ModelConfig,
    sampling: SamplingConfig,
    stop_ids: tuple[int, ...],
    pad_id: int,
    steps: int,
    lora_kernel: bool = False,
    attention_kernel: bool = False,
    top_k_kernel: bool = False,
) -> tuple[DecodeRows, Int[Array, ""], Int[Array, ""]]:
    """Up to `steps` decode steps of every running row. Over a float32 cache the call returns early, after the step
    in which a row stops, so that the caller refills that row at once instead of letting it idle to the chunk's end.
    A buffered (bfloat16) cache runs all `steps` while a row runs: a row attends to the cache and the call's buffer
    as two sums, so an early return would move where its keys split between them, and its sums' rounding, with its
    batch-mates' stops; a full call splits them every `steps` tokens of the row's own turn. Row b uses
    the pool's adapter / offset `sessions[b]`; `attention_kernel` attends over a buffered cache with the CPU kernel
    (`kernels/decode_attention.py`), `top_k_kernel` takes the sampler's candidates with kernels/top_k.py (the
    same draws). Returns (rows, tokens generated, steps run)."""
    B, N = rows.out.shape
    row_adapters = _session_adapters(adapters, sessions)
    offset = _session_offset(offsets, sessions, rows.logits.dtype)
    stop = jnp.asarray(stop_ids, jnp.int32)
    idle = rows.done
    # A buffered cache is only read during the call: its new keys/values go to a buffer of `steps` slots, merged
    # into it after the loop.
    buffered = cache_is_buffered(rows.cache.k[0].dtype)
    cache, start = rows.cache, rows.length
    buffer = KVCache.empty(cfg, B, steps, cache.k[0].dtype) if buffered else None

    def cond(state):
        i, rows, _, _ = state
        stopped = jnp.zeros((), bool) if buffered else jnp.any(rows.done & ~idle)
        return (i < steps) & ~stopped & ~jnp.all(rows.done)

    def body(state):
        i, rows, buffer, generated = state
        running = ~rows.done
        with jax.named_scope("sampling"):
            step_keys = jax.vmap(jax.random.fold_in)(rows.keys, rows.count)
            tok = sample_logits(rows.logits, step_keys, sampling, rows.greedy, top_k_kernel=top_k_kernel)
        tok = jnp.where(running, tok, pad_id)
        at_count = running[:, None] & (jnp.arange(N)[None] == rows.count[:, None])
        out = jnp.where(at_count, tok[:, None], rows.out)
        count = rows.count + running
        done = rows.done | jnp.isin(tok, stop) | (count >= rows.limit)
        # The sampled token is fed even when it ends the turn: the cache then holds the whole turn, which
        # the session's next turn reuses. Rows not running write an invalid slot: past their length in the
        # cache, or in the buffer, which the merge then skips.
        hidden, written = decoder_hidden(
            params, tok[:, None], rows.length[:, None], running[:, None], cfg=cfg,
            cache=cache if buffered else rows.cache, cache_index=start if buffered else rows.length,
            adapters=row_adapters, lora_kernel=lora_kernel, attention_kernel=attention_kernel, buffer=buffer,
            buffer_index=i)
        with jax.named_scope("lm_head"):
            logits = lm_logits(params, hidden[:, 0] + offset, cfg).astype(jnp.float32)
        rows = rows.replace(length=rows.length + running, logits=logits, count=count, done=done, out=out)
        if buffered:
            buffer = written
        else:
            rows = rows.replace(cache=written)
        return i + 1, rows, buffer, generated + jnp.sum(running)

    steps_run, rows, buffer, generated = jax.lax.while_loop(cond, body, (jnp.int32(0), rows, buffer, jnp.int32(0)))
    if buffered:
        with jax.named_scope("cache_write"):
            rows = rows.replace(cache=_merge_buffer(cache, buffer, start))
    return rows, generated, steps_run


def _merge_buffer(cache: KVCache, buffer: KVCache, start: Int[Array, "B"]) -> KVCache:
    """The cache with a decode call's buffer written in: row b's valid buffer slots t at slots start[b] + t.

    A select over every slot rather than a scatter: XLA CPU scatters into a bfloat16 array by converting all of it
    to float32 and back (with fresh buffers' page faults, ~10 ms a step amortized at 16 rows x 384 slots)."""
    T, S = buffer.valid.shape[1], cache.valid.shape[1]
    offset = jnp.arange(S)[None] - start[:, None]  # [B, S]: the buffer slot each cache slot would take
    source = jnp.clip(offset, 0, T - 1)
    take = (offset >= 0) & (offset < T) & jnp.take_along_axis(buffer.valid, source, axis=1)

    def merged(old, new, axis):  # a cache array and its buffer, slots along `axis`
        shape = [1] * old.ndim
        shape[0], shape[axis] = -1, S
        index, where = source.reshape(shape), take.reshape(shape)
        return jnp.where(where, jnp.take_along_axis(new, index, axis=axis), old)

    return KVCache(tuple(merged(k, n, 3) for k, n in zip(cache.k, buffer.k)),
                   tuple(merged(v, n, 2) for v, n in zip(cache.v, buffer.v)), cache.valid | take)
