"""The token-level session engine: continuous batching across sessions, prefix reuse between turns, Weights
steps batched as sessions fail.

`SessionEngine` (engine.py) is turn-synchronous: a step generates one turn for every slot, waits for the
longest answer, adapts, and prefills every history again. `TokenEngine` keeps a pool of sessions (more than
the decode batch) and moves each through its phases on its own:

    ready ──prefill into a free row──> generating ──row stops──> judged ──> ended (record written)
      ^                                                            │
      └──── advance (next user message) <── Words (worker thread) ─┤ failed
                                        <── Weights (queued, one vmapped step per bucket of failures)

Every decode call runs up to `decode_steps` tokens for all rows and returns as soon as a row stops; that row
is refilled before the next call with a ready session (its new tokens prefilled in chunks of at most
`prefill_chunk`). A session whose weights did not change keeps its KV cache while it waits and prefills
only what its next prompt adds (the longest common prefix of the cached tokens and the new prompt is
reused). A Weights step runs when its bucket is full, or when a row would otherwise decode empty. A Words
job starts on the worker threads as soon as a session fails (beside another job if the critic is the policy,
whose requests decode in the rows; else one at a time, the failures queued meanwhile going together).
The rows may hold sessions of several methods at once (`engine.Work`).

Trajectories do not depend on scheduling: a session samples its n-th token of a turn with the turn's seed
folded with n, exactly as the turn engine does, so under greedy decoding both engines write the same records.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from concurrent.futures import Future
from queue import Empty, SimpleQueue
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from rosa2_jax.adapt.text_models import LocalTextModel
from rosa2_jax.engine import Session, SessionEngine, Work
from rosa2_jax.kernels.lora_matmul import kernel_supported
from rosa2_jax.methods import Failure, Stream, session_seed
from rosa2_jax.model.decode_rows import decode_chunk, empty_rows, prefill_row, put_row_cache, resize_rows, row_cache
from rosa2_jax.model.generation import Generation, bucket_length
from rosa2_jax.tasks.data import Problem


@dataclasses.dataclass
class _Waiting:
    """A failed session waiting for its streams."""

    failure: Failure
    streams: set[Stream]
    timing: dict[str, float]  # the turn's generate_s, update_s, words_s
    results: dict[Stream, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(eq=False)  # hashed by identity
class _TextRequest:
    """A text model's requests from a worker thread, decoded in the engine's rows (greedily, or sampled with the
    rows' sampling config and `seeds`); `future` gets the generations, in order."""

    prompts: list[list[int]]
    max_tokens: int
    seeds: list[int] | None = None
    future: Future = dataclasses.field(default_factory=Future)
    gens: list = dataclasses.field(default_factory=list)  # None where a prompt is still decoding

    def __post_init__(self):
        self.gens = [None] * len(self.prompts)


@dataclasses.dataclass
class SchedulerStats:
    """What the decode batch did: occupancy = generated / row_steps."""

    generated: int = 0  # tokens sampled by running rows
    text_generated: int = 0  # of which text-model requests (Words critiques and rewrites)
    row_steps: int = 0  # decode steps x rows
    prefilled: int = 0  # prompt tokens computed
    reused: int = 0  # prompt tokens taken from a session's kept cache
    decode_s: float = 0.0
    prefill_s: float = 0.0
    update_s: float = 0.0
    updates: int = 0  # Weights buckets run

    @property
    def occupancy(self) -> float:
        return self.generated / max(self.row_steps, 1)

    def __str__(self) -> str:
        return (f"decode {self.decode_s:.0f} s, {self.generated:,} tokens ({self.text_generated:,} for the text model), "
                f"occupancy {self.occupancy:.2f}; prefill {self.prefill_s:.0f} s, {self.prefilled:,} tokens "
                f"({self.reused:,} reused); {self.updates} Weights steps {self.update_s:.0f} s")


class TokenEngine(SessionEngine):
    """Runs `cfg.method` with `cfg.slots` decode rows and a pool of `cfg.sessions` sessions (0: twice the rows).
    On a mesh, rows and pool are split over its `data` axis."""

    def __init__(self, model, cfg, text_model=None, adapter_cache=None):
        self.text_inbox: SimpleQueue[_TextRequest] = SimpleQueue()  # from worker threads
        self.wake = threading.Event()  # set by a text request or a finished host job
        self.stopped = threading.Event()  # the run is over: text requests are refused
        super().__init__(model, cfg, text_model, adapter_cache)
        if self.sessions < cfg.slots:
            raise ValueError(f"sessions={self.sessions} must be at least slots={cfg.slots}")
        if self._text_in_rows():
            self.words_model = self.words_model.replace(rows=self._decode_text)
        self.lora_kernel = kernel_supported(self.mesh)
        self.stats = SchedulerStats()

    def _pool_size(self) -> int:
        """The sessions, then one block of the mesh's data extent whose last slot is the base weights (its
        adapter is never reset or updated, so it stays zero): text-model requests decode with it."""
        self.sessions = -(-(self.cfg.sessions or 2 * self.cfg.slots) // self.data) * self.data
        self.base_slot = self.sessions + self.data - 1
        return self.sessions + self.data

    def _text_in_rows(self) -> bool:
        return isinstance(self.text_model, LocalTextModel) and self.text_model.model is self.model

    def _host_workers(self) -> int:
        return self.sessions if self._text_in_rows() else 1

    def _decode_text(self, prompts: list[list[int]], max_tokens: int, seeds: list[int] | None) -> list[Generation]:
        """Called on a worker thread: queue the prompts for the rows and wait for their generations."""
        if max_tokens > self.max_new:
            raise ValueError(f"a text request of {max_tokens} tokens exceeds the rows' {self.max_new}")
        request = _TextRequest(prompts, max_tokens, seeds)
        self.text_inbox.put(request)
        self.wake.set()
        if self.stopped.is_set():  # the run ended (or failed) before taking it
            self._refuse_text_requests([])
        return request.future.result()

    def _refuse_text_requests(self, pending: Iterable[_TextRequest]) -> None:
        """Fail every text request not yet answered, so that no worker thread waits for a run that is over."""
        for request in {*pending, *self._take_text_requests()}:
            if not request.future.done():
                request.future.set_exception(RuntimeError("the engine stopped before decoding this text request"))

    def _take_text_requests(self) -> list[_TextRequest]:
        """The text requests the worker threads have queued since the last call."""
        taken = []
        while True:
            try:
                taken.append(self.text_inbox.get_nowait())
            except Empty:
                return taken

    @property
    def max_new(self) -> int:
        """Tokens a row can generate: the policy's max_new_tokens, or a Words request's if that is longer."""
        n = self.cfg.sampling.max_new_tokens
        return max(n, self.cfg.critic_tokens, self.cfg.rewrite_tokens) if self._text_in_rows() else n

    # ------------------------------------------------------------------ device calls
    def _fit(self, prefill_extent: int = 0) -> None:
        """Size the rows' cache to the longest occupied row's prompt + token limit + 1 (and a prefill's
        padded extent), bucketed so that a sweep compiles a few programs. It shrinks too: every decode step's
        attention reads every slot, so a cache sized for a long turn that has left slows all the others."""
        needed = max([n for row, n in enumerate(self.row_need) if self._occupied(row)] + [prefill_extent, 1])
        if bucket_length(needed) != self.rows.capacity:
            self.rows = resize_rows(self.rows, capacity=bucket_length(needed))

    def _occupied(self, row: int) -> bool:
        return self.row_slot[row] is not None or self.row_text[row] is not None

    def _prefill(self, row: int, slot: int, prompt: list[int], key: jax.Array, limit: int | None = None,
                 greedy: bool = False) -> None:
        """Put session `slot`'s turn into `row`: its kept cache where the prompt extends it, the rest prefilled.
        The row then generates at most `limit` tokens (default max_new_tokens), greedily if `greedy`."""
        saved, reuse = None, 0
        if slot in self.kept:
            saved, tokens = self.kept.pop(slot)
            reuse = min(_common_prefix(tokens, prompt), len(prompt) - 1)
        chunk = self.cfg.prefill_chunk
        starts = range(reuse, len(prompt), chunk)
        limit = limit or self.cfg.sampling.max_new_tokens
        self.row_need[row] = len(prompt) + limit + 1
        self._fit(max(self.row_need[row], *(s + bucket_length(len(prompt[s: s + chunk])) for s in starts)))
        if reuse:
            self.rows = put_row_cache(self.rows, jnp.int32(row), saved)
        inputs = self._generation_inputs()
        for s in starts:
            piece = prompt[s: s + chunk]
            padded = np.full(bucket_length(len(piece)), self.sampler.pad_id, np.int32)
            padded[: len(piece)] = piece
            self.rows = prefill_row(self.sampler.decode_params, self.rows, jnp.int32(row), jnp.asarray(padded),
                                    jnp.int32(len(piece)), jnp.int32(s), key, inputs.get("adapters"),
                                    inputs.get("hidden_offset"), jnp.int32(slot), jnp.int32(limit),
                                    jnp.bool_(greedy), cfg=self.model.cfg,
                                    fresh=s == 0, lora_kernel=self.lora_kernel)
        self.stats.reused += reuse
        self.stats.prefilled += len(prompt) - reuse

    def _decode(self) -> None:
        self._fit()
        inputs = self._generation_inputs()
        sessions = jnp.asarray([self.base_slot if slot is None else slot for slot in self.row_slot], jnp.int32)
        self.rows, generated, steps = decode_chunk(
            self.sampler.decode_params, self.rows, inputs.get("adapters"), inputs.get("hidden_offset"), sessions,
            cfg=self.model.cfg, sampling=self.cfg.sampling, stop_ids=self.sampler.stop_ids,
            pad_id=self.sampler.pad_id, steps=self.cfg.decode_steps, lora_kernel=self.lora_kernel)
        generated, steps = jax.device_get((generated, steps))
        self.stats.generated += int(generated)
        self.stats.row_steps += int(steps) * self.cfg.slots

    # ------------------------------------------------------------------ the whole run
    def run(self, problems: Iterable[Work], on_finish: Callable[[Session], None],
            on_ready: Callable[[Session], None] = lambda s: None) -> None:
        cfg = self.cfg
        work = self.queue = self._work(problems)
        self.rows = empty_rows(self.model.cfg, cfg.slots, bucket_length(1), self.max_new,
                               self.model.params["embed"].dtype, self.sampler.pad_id)
        self.row_slot: list[int | None] = [None] * cfg.slots  # the pool slot generating in each row
        self.row_text: list[tuple[_TextRequest, int] | None] = [None] * cfg.slots  # or a text request's prompt
        self.row_need = [0] * cfg.slots  # cache slots each row's turn needs: prompt + its token limit + 1
        self.kept: dict[int, tuple[Any, list[int]]] = {}  # pool slot -> (its row's cache, the tokens it holds)
        self.stopped.clear()
        run = _Run(work, on_finish, on_ready, free=deque(range(self.sessions)))
        try:
            self._run(run)
        finally:
            self.stopped.set()
            self._refuse_text_requests([r for r, _ in run.text_ready] + [t[0] for t in self.row_text if t])

    def _run(self, run: "_Run") -> None:
        cfg = self.cfg
        while self._admissible() or run.sessions:
            while run.free and self._admissible():  # admit new problems into the pool
                i = run.free.popleft()
                s = self._admit(i, run.queue.popleft())
                if s.error:
                    run.on_finish(s)
                    run.free.appendleft(i)
                else:
                    run.sessions[i] = s
                    run.ready.append(i)
            self._replay()
            for request in self._take_text_requests():
                run.text_ready.extend((request, j) for j in range(len(request.prompts)))
            for row in range(cfg.slots):  # refill stopped rows; text requests first, since sessions wait on them
                if not self._occupied(row) and run.text_ready:
                    self._start_text(row, *run.text_ready.popleft())
                elif not self._occupied(row) and run.ready:
                    self._start_turn(run, row, run.ready.popleft())
            if any(map(self._occupied, range(cfg.slots))):
                running = [i for i in self.row_slot if i is not None]
                t0 = time.perf_counter()
                self._decode()
                seconds = time.perf_counter() - t0
                self.stats.decode_s += seconds
                run.charge(running, seconds)
                self._collect(run)
            for stream, future in [job for job in run.host_jobs if job[1].done()]:
                run.host_jobs.remove((stream, future))
                results, seconds = future.result()
                run.charge(list(results), seconds)
                self._deliver(run, stream, results, seconds)
            self._start_host_jobs(run)
            occupied = [self._occupied(row) for row in range(cfg.slots)]
            nothing_ready = not run.ready and not run.text_ready and not (run.free and self._admissible())
            idle = nothing_ready and not any(occupied)
            # A row that nothing can fill would decode empty: the queued Weights step goes first, so that its
            # sessions fill it (beside other methods' sessions, the bucket may never fill).
            if run.weights_queue and (len(run.weights_queue) >= cfg.slots or (nothing_ready and not all(occupied))):
                self._weights_step(run)
            elif idle and run.host_jobs:
                self.wake.wait()  # for a host job to finish or to ask for text
                self.wake.clear()

    def _start_text(self, row: int, request: _TextRequest, j: int) -> None:
        """Put prompt j of a text request into `row`, on the base weights."""
        seed = 0 if request.seeds is None else request.seeds[j]
        self._prefill(row, self.base_slot, request.prompts[j], jax.random.key(seed), limit=request.max_tokens,
                      greedy=request.seeds is None)
        jax.block_until_ready(self.rows.length)
        self.row_text[row] = (request, j)

    def _start_turn(self, run: "_Run", row: int, i: int) -> None:
        s = run.sessions[i]
        t0 = time.perf_counter()
        run.prompts[i] = self._prompt_ids(s)
        s.turn += 1
        self._prefill(row, i, run.prompts[i], jax.random.key(session_seed(self.cfg.seed, s.problem.id, s.turn)))
        jax.block_until_ready(self.rows.length)  # so that prefill time is not billed to the next decode call
        self.row_slot[row] = i
        run.turn_start[i] = time.perf_counter()
        self.stats.prefill_s += run.turn_start[i] - t0
        run.charge([i], run.turn_start[i] - t0)

    def _collect(self, run: "_Run") -> None:
        """Judge the rows that stopped; end, or start the streams of, their sessions."""
        done, count = jax.device_get((self.rows.done, self.rows.count))
        stopped = [row for row in range(self.cfg.slots) if self._occupied(row) and done[row]]
        if not stopped:
            return
        out = jax.device_get(self.rows.out[jnp.asarray(stopped)])
        gens, rows = {}, {}
        for k, row in enumerate(stopped):
            tokens = out[k, : count[row]].tolist()
            finish = "stop" if tokens and tokens[-1] in self.sampler.stop_ids else "length"
            if self.row_text[row] is not None:
                request, j = self.row_text[row]
                self.row_text[row] = None
                request.gens[j] = Generation(tokens, finish, len(request.prompts[j]))
                self.stats.text_generated += len(tokens)
                if None not in request.gens:
                    request.future.set_result(request.gens)
                continue
            i = self.row_slot[row]
            gens[i] = Generation(tokens, finish, len(run.prompts[i]))
            rows[i] = row
            self.row_slot[row] = None
        if not gens:
            return
        now = time.perf_counter()
        ended, failed = self.judge({i: run.sessions[i] for i in gens}, {i: run.prompts[i] for i in gens}, gens)
        timing = {i: {"generate_s": now - run.turn_start.pop(i), "update_s": 0.0, "words_s": 0.0} for i in gens}
        for i in ended:
            self.advance({i: run.sessions[i]}, [i], [], timing[i])
            self.kept.pop(i, None)
            self._finished(run.sessions.pop(i), run.on_finish)
            run.free.append(i)
        host: dict[Stream, dict[int, Failure]] = {}
        for i, f in failed.items():
            streams = self._streams_after(f.session)
            if not any(st.changes_weights for st in streams):  # the cache stays valid for the next turn
                self.kept[i] = (row_cache(self.rows, jnp.int32(rows[i])), run.prompts[i] + f.tokens)
            run.waiting[i] = _Waiting(f, streams, timing=timing[i])
            for st in streams:
                if st.on_device:
                    run.weights_queue[i] = f
                else:
                    host.setdefault(st, {})[i] = f
            if not streams:
                self._resume(run, i)
        for st, mine in host.items():
            run.host_queue.setdefault(st, {}).update(mine)

    def _start_host_jobs(self, run: "_Run") -> None:
        """Start each host stream's queued failures as one job. A text model apart from the policy has one job in
        flight per stream: failures that arrive while it runs wait and go together in the next, so that it
        generates for many sessions at once (about the cost of one on a memory-bound decode) instead of one after
        another. The policy's own critic decodes in the rows, which batch every job's requests, so its jobs
        start at once."""
        busy = set() if self._text_in_rows() else {st for st, _ in run.host_jobs}
        for st in [st for st in run.host_queue if st not in busy]:
            future = st.start(run.host_queue.pop(st))
            future.add_done_callback(lambda _: self.wake.set())
            run.host_jobs.append((st, future))

    def _deliver(self, run: "_Run", stream: Stream, results: dict[int, Any], seconds: float) -> None:
        """Hand a stream's results to their waiting sessions; those with every result go on."""
        for i, result in results.items():
            w = run.waiting[i]
            w.results[stream] = result
            w.timing[stream.timing_key] += seconds
            if len(w.results) == len(w.streams):
                self._resume(run, i)

    def _resume(self, run: "_Run", i: int) -> None:
        """Session i has every stream result: write them (in the turn engine's order) and the next message."""
        w = run.waiting.pop(i)
        order = sorted(w.results, key=lambda st: st.on_device)
        self.advance({i: run.sessions[i]}, [], [(st, {i: w.results[st]}) for st in order], w.timing)
        run.ready.append(i)
        self._ready(i, run.sessions[i], run.on_ready)

    def _weights_step(self, run: "_Run") -> None:
        bucket = dict(list(run.weights_queue.items())[: self.cfg.slots])
        for i in bucket:
            del run.weights_queue[i]
        stream = next(st for st in self.streams.values() if st.on_device)
        results, seconds = stream.start(bucket).result()
        self.stats.update_s += seconds
        self.stats.updates += 1
        run.charge(list(bucket), seconds)
        self._deliver(run, stream, results, seconds)


@dataclasses.dataclass
class _Run:
    """Where every session of a run is: in the pool (`sessions`), ready to generate, generating (the
    engine's `row_slot`), or waiting for its streams (`waiting`, with a Weights step queued or Words jobs
    on the worker thread)."""

    queue: deque[tuple[str, Problem] | Session]  # (method, problem) or restored sessions not yet admitted
    on_finish: Callable[[Session], None]
    on_ready: Callable[[Session], None]
    free: deque[int]  # pool slots without a session
    sessions: dict[int, Session] = dataclasses.field(default_factory=dict)
    ready: deque[int] = dataclasses.field(default_factory=deque)
    prompts: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # the current turn's prompt ids
    turn_start: dict[int, float] = dataclasses.field(default_factory=dict)
    waiting: dict[int, _Waiting] = dataclasses.field(default_factory=dict)
    weights_queue: dict[int, Failure] = dataclasses.field(default_factory=dict)
    host_jobs: list[tuple[Stream, Future]] = dataclasses.field(default_factory=list)
    text_ready: deque[tuple[_TextRequest, int]] = dataclasses.field(default_factory=deque)  # prompts for rows
    host_queue: dict[Stream, dict[int, Failure]] = dataclasses.field(default_factory=dict)  # waiting for a job

    def charge(self, slots: list[int], seconds: float) -> None:
        """Split `seconds` of device or host time over these sessions."""
        for i in slots:
            self.sessions[i].seconds += seconds / max(len(slots), 1)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    mismatch = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(mismatch[0]) if mismatch.size else n


SCHEDULERS = {"token": TokenEngine, "turn": SessionEngine}
