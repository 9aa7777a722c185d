"""The token engine's decode batch on the host side: which pool slot (or text request) each row holds, the cache
slots its turn needs, the caches kept for sessions between turns and for text prompts that share a prefix, and the
device calls on the rows (model/decode_rows.py)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rosa2_jax.checkpoint import LoadedModel
from rosa2_jax.engine.config import EngineConfig
from rosa2_jax.engine.stats import SchedulerStats
from rosa2_jax.model.decode_rows import decode_chunk, empty_rows, prefill_row, resize_rows, row_cache
from rosa2_jax.model.decoder import cache_dtype
from rosa2_jax.model.generation import bucket_length

# Prompts of finished text requests whose caches are kept: a Words step's critic and writer prompts each open with
# their fixed system message, and a writer's retry repeats its whole first prompt but the last message.
TEXT_CACHES = 8


class DecodeBatch:
    """`cfg.rows` rows over one cache of a bucketed capacity. A row is free, generates a session's turn
    (`slot[row]`, its pool slot) or decodes a text request's prompt (`text[row]`, on the base weights)."""

    def __init__(self, model: LoadedModel, cfg: EngineConfig, *, max_new: int, lora_kernel: bool,
                 stats: SchedulerStats, attention_kernel: bool = False, top_k_kernel: bool = False):
        self.model, self.cfg, self.stats, self.lora_kernel = model, cfg, stats, lora_kernel
        self.attention_kernel, self.top_k_kernel = attention_kernel, top_k_kernel
        self.sampler = model.sampler
        self.device = empty_rows(model.cfg, cfg.rows, bucket_length(1), max_new,
                                 cache_dtype(self.sampler.decode_params), self.sampler.pad_id)
        self.slot: list[int | None] = [None] * cfg.rows  # the pool slot generating in each row
        self.text: list[Any] = [None] * cfg.rows  # or (a text request, its prompt's index)
        self.need = [0] * cfg.rows  # cache slots each row's turn can reach: prompt + its token limit + 1
        self.held = [0] * cfg.rows  # at most this many tokens in each row's cache (prompt + tokens decoded so far)
        # pool slot -> (its row's cache, the tokens it holds, None or, where a Weights step changed the session's
        # adapter, (the first layer it changed, the residual stream entering that layer at those tokens or None
        # until the step has run))
        self.kept: dict[int, tuple[Any, list[int], tuple[int, Any] | None]] = {}
        self.text_kept: list[tuple[Any, list[int]]] = []  # (a text prompt's cache, the prompt), oldest first

    def occupied(self, row: int) -> bool:
        return self.slot[row] is not None or self.text[row] is not None

    def fit(self, filling: int | None = None) -> None:
        """Size the cache to what the next decode call can fill: the longest occupied row's (and the `filling` row's)
        tokens + the call's steps + 1, at most its turn's reach, bucketed so that a sweep compiles a few programs.
        Every decode step's attention reads every slot, so the cache grows with the rows rather than holding each
        turn's token limit from its start, and shrinks when a long row leaves."""
        needed = max([self._reach(row) for row in range(self.cfg.rows) if self.occupied(row) or row == filling]
                     + [1])
        if bucket_length(needed) != self.device.capacity:
            self.device = resize_rows(self.device, capacity=bucket_length(needed))

    def _reach(self, row: int) -> int:
        """Cache slots `row` can fill by the end of the next decode call, at most its turn's reach."""
        return min(self.need[row], self.held[row] + self.cfg.decode_steps + 1)

    def prefill(self, row: int, slot: int, prompt: list[int], key: jax.Array, inputs: dict[str, Any],
                limit: int | None = None, greedy: bool = False, text: bool = False) -> None:
        """Put session `slot`'s turn into `row` (a text request's prompt with `text`, on the base weights' slot):
        its kept cache (for text, the kept text prompt sharing the longest prefix) where the prompt extends it,
        the rest prefilled with the streams' `inputs`. The row then generates at most `limit` tokens (default
        max_new_tokens), greedily if `greedy`."""
        stale = None
        if text and self.text_kept:
            self.text_kept.append(self.text_kept.pop(self._closest_text(prompt)))  # the most recently used goes last
            saved, tokens = self.text_kept[-1]
        else:
            saved, tokens, stale = (None, [], None) if text else self.kept.pop(slot, (None, [], None))
            if stale is not None and stale[1] is None:  # no inputs to compute the changed layers from
                saved, tokens, stale = None, [], None
        reuse = min(common_prefix(tokens, prompt), len(prompt) - 1)
        refresh = None if stale is None or not reuse else stale
        limit = limit or self.cfg.sampling.max_new_tokens
        self.need[row], self.held[row] = len(prompt) + limit + 1, len(prompt)
        self.fit(filling=row)  # the caller marks the row occupied once it is filled
        self.device = prefill_row(self.sampler.decode_params, self.device, row, prompt, key, cfg=self.model.cfg,
                                  pad_id=self.sampler.pad_id, prefix=saved, reuse=reuse, chunk=self.cfg.prefill_chunk,
                                  adapters=inputs.get("adapters"), offsets=inputs.get("hidden_offset"), session=slot,
                                  limit=limit, greedy=greedy, lora_kernel=self.lora_kernel,
                                  refresh=None if refresh is None else refresh[1],
                                  first_layer=0 if refresh is None else refresh[0])
        if text:
            self.stats.text_reused += reuse
        else:
            self.stats.reused += reuse
            self.stats.refreshed += 0 if refresh is None else reuse
        self.stats.prefilled += len(prompt) - reuse

    def decode(self, inputs: dict[str, Any], base_slot: int) -> None:
        """Up to `decode_steps` tokens for every row (free rows and text requests on the base weights' slot); over a
        float32 cache it returns after the step in which a row stops."""
        self.fit()
        sessions = jnp.asarray([base_slot if slot is None else slot for slot in self.slot], jnp.int32)
        self.device, generated, steps = decode_chunk(
            self.sampler.decode_params, self.device, inputs.get("adapters"), inputs.get("hidden_offset"), sessions,
            cfg=self.model.cfg, sampling=self.cfg.sampling, stop_ids=self.sampler.stop_ids,
            pad_id=self.sampler.pad_id, steps=self.cfg.decode_steps, lora_kernel=self.lora_kernel,
            attention_kernel=self.attention_kernel, top_k_kernel=self.top_k_kernel)
        generated, steps = jax.device_get((generated, steps))
        self.held = [held + int(steps) for held in self.held]
        self.stats.generated += int(generated)
        self.stats.row_steps += int(steps) * self.cfg.rows

    def stopped(self) -> list[tuple[int, list[int], str]]:
        """(row, its turn's tokens, finish reason) of every occupied row whose turn has ended."""
        done, count = jax.device_get((self.device.done, self.device.count))
        rows = [row for row in range(self.cfg.rows) if self.occupied(row) and done[row]]
        if not rows:
            return []
        out = jax.device_get(self.device.out[jnp.asarray(rows)])
        stopped = []
        for k, row in enumerate(rows):
            tokens = out[k, : count[row]].tolist()
            stopped.append((row, tokens, "stop" if tokens and tokens[-1] in self.sampler.stop_ids else "length"))
        return stopped

    def keep(self, slot: int, row: int, tokens: list[int], changed_from: int | None = None) -> None:
        """Keep `row`'s cache (holding `tokens`) for pool slot `slot`'s next turn; with `changed_from`, a Weights
        step is about to change the session's adapter from that layer on (`refresh` then gives the step's
        inputs to it)."""
        self.kept[slot] = (row_cache(self.device, jnp.int32(row)), tokens,
                           None if changed_from is None else (changed_from, None))

    def refresh(self, slot: int, inputs: Any) -> None:
        """A Weights step has run for `slot`: `inputs` is the residual stream entering the first layer it changed,
        at the held tokens [R, d], from which the next prefill computes those layers again; None, the step left
        the adapter as it was and the held cache stays valid."""
        if slot in self.kept and self.kept[slot][2] is not None:
            cache, tokens, (first, _) = self.kept[slot]
            self.kept[slot] = (cache, tokens, None if inputs is None else (first, inputs))

    def keep_text(self, row: int, prompt: list[int]) -> None:
        """Keep the cache of a text request's `row` for later prompts that share a prefix with its `prompt` (the
        `TEXT_CACHES` most recently used)."""
        others = [kept for kept in self.text_kept if kept[1] != prompt]
        self.text_kept = (others + [(row_cache(self.device, jnp.int32(row)), prompt)])[-TEXT_CACHES:]

    def _closest_text(self, prompt: list[int]) -> int:
        """Index of the kept text prompt sharing the longest prefix with `prompt` (the most recent among equals)."""
        shared = [common_prefix(tokens, prompt) for _, tokens in self.text_kept]
        return max(range(len(shared)), key=lambda k: (shared[k], k))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    mismatch = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(mismatch[0]) if mismatch.size else n
