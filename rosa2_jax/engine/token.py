"""The token engine: continuous batching across sessions, prefix reuse between turns, Weights steps batched as
sessions fail.

The turn engine (engine/turn.py) generates one turn for every slot, waits for the longest answer, adapts, and
prefills every history again. `TokenEngine` keeps a pool of sessions (more than the decode rows) and moves each
through the lifecycle on its own:

    ready ──prefill into a free row──> generating ──row stops──> judged ──> ended (record written)
      ^                                                            │
      └──── advance (next user message) <── Words (worker thread) ─┤ failed
                                        <── Weights (queued, one vmapped step per bucket of failures)

Each pass of the loop is three steps over one state (`_Run`): schedule (admit problems into the pool, restore, fill
free rows with ready sessions or text requests), execute (one decode call of up to `decode_steps` tokens, which over
a float32 cache returns as soon as a row stops), update (judge the stopped rows, hand finished host jobs their
sessions, start new ones, run a Weights bucket). A session whose weights did not change keeps its KV cache while it
waits and prefills only what its next prompt adds. A Weights step runs when its bucket is full, or when a row would
otherwise decode empty. A Words job starts on the worker threads as soon as a session fails (beside another job if
the critic is the policy, whose requests decode in the rows; else one at a time, the failures queued meanwhile going
together). The rows may hold sessions of several methods at once.

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

from rosa2_jax.adapt.text_models import LocalTextModel
from rosa2_jax.engine.host_memory import HostMemory
from rosa2_jax.engine.lifecycle import Engine, Lifecycle, Queued, data_shards, words_model
from rosa2_jax.engine.rows import DecodeBatch
from rosa2_jax.engine.session import Failure, Session, Work, session_seed
from rosa2_jax.engine.stats import SchedulerStats
from rosa2_jax.engine.streams import Stream
from rosa2_jax.kernels.decode_attention import attention_kernel_supported
from rosa2_jax.kernels.lora_matmul import kernel_supported
from rosa2_jax.kernels.top_k import top_k_kernel_supported
from rosa2_jax.model.generation import Generation


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
class _Run:
    """Where every session of a run is: in the pool (`sessions`), ready to generate, generating (in
    `batch.slot`), or waiting for its streams (`waiting`, with a Weights step queued or Words jobs on the worker
    thread)."""

    queue: deque[Queued]  # (method, problem) or restored sessions not yet admitted
    on_finish: Callable[[Session], None]
    on_ready: Callable[[Session], None]
    free: deque[int]  # pool slots without a session
    batch: DecodeBatch
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


class TokenEngine(Engine):
    """Runs `cfg.rows` decode rows over a pool of `cfg.sessions` sessions (0: twice the rows). On a mesh, rows
    and pool are split over its `data` axis. The pool's last block of the data extent holds the base weights
    (its adapter is never reset or updated, so it stays zero): text-model requests decode with it."""

    def __init__(self, model, cfg, text_model=None, adapter_cache=None):
        self.text_inbox: SimpleQueue[_TextRequest] = SimpleQueue()  # from worker threads
        self.wake = threading.Event()  # set by a text request or a finished host job
        self.stopped = threading.Event()  # the run is over: text requests are refused
        data = data_shards(model)
        self.sessions = -(-(cfg.sessions or 2 * cfg.rows) // data) * data
        if self.sessions < cfg.rows:
            raise ValueError(f"sessions={self.sessions} must be at least the decode rows ({cfg.rows}, --slots)")
        self.base_slot = self.sessions + data - 1
        self.text_in_rows = isinstance(text_model, LocalTextModel) and text_model.model is model
        words = words_model(text_model, cfg)
        if self.text_in_rows:
            words = words.replace(rows=self._decode_text)
        self.life = Lifecycle(model, cfg, text_model, pool_size=self.sessions + data,
                              host_workers=self.sessions if self.text_in_rows else 1, words=words,
                              adapter_cache=adapter_cache)
        self.lora_kernel = kernel_supported(model.mesh)
        self.attention_kernel = attention_kernel_supported(model.mesh)
        self.top_k_kernel = top_k_kernel_supported(model.mesh)
        self.stats = SchedulerStats()

    @property
    def max_new(self) -> int:
        """Tokens a row can generate: the policy's max_new_tokens, or a Words request's if that is longer."""
        n = self.cfg.sampling.max_new_tokens
        return max(n, self.cfg.critic_tokens, self.cfg.rewrite_tokens) if self.text_in_rows else n

    # ------------------------------------------------------------------ text requests from worker threads
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

    # ------------------------------------------------------------------ the whole run
    def run(self, problems: Iterable[Work], on_finish: Callable[[Session], None],
            on_ready: Callable[[Session], None] = lambda s: None) -> None:
        queue = self.life.start(problems)
        if (weights := self.life.weights()) is not None:  # a step's inputs to the layers it changes refresh the cache
            weights.keep_layer_inputs = 0 < weights.first_changed_layer < self.life.model.cfg.num_layers
        batch = DecodeBatch(self.life.model, self.cfg, max_new=self.max_new, lora_kernel=self.lora_kernel,
                            attention_kernel=self.attention_kernel, top_k_kernel=self.top_k_kernel,
                            stats=self.stats)
        run = _Run(queue, on_finish, on_ready, free=deque(range(self.sessions)), batch=batch)
        self.stopped.clear()
        host_memory = HostMemory(self.cfg.max_programs)
        try:
            while self.life.admissible() or run.sessions:
                self.stats.programs_released += host_memory.tend()
                self._schedule(run)
                decoded = self._execute(run)
                self._update(run, decoded)
        finally:
            self.stopped.set()
            self._refuse_text_requests([r for r, _ in run.text_ready] + [t[0] for t in batch.text if t])

    def _schedule(self, run: _Run) -> None:
        """Admit problems into free pool slots, restore, and fill free rows: text requests first, since sessions
        wait on them, then ready sessions."""
        life = self.life
        while run.free and life.admissible():
            i = run.free.popleft()
            s = life.admit(i, run.queue.popleft())
            if s.error:
                run.on_finish(s)
                run.free.appendleft(i)
            else:
                run.sessions[i] = s
                run.ready.append(i)
        life.restore.replay()
        for request in self._take_text_requests():
            run.text_ready.extend((request, j) for j in range(len(request.prompts)))
        for row in range(self.cfg.rows):
            if not run.batch.occupied(row) and run.text_ready:
                self._start_text(run.batch, row, *run.text_ready.popleft())
            elif not run.batch.occupied(row) and run.ready:
                self._start_turn(run, row, run.ready.popleft())

    def _execute(self, run: _Run) -> bool:
        """One decode call over the rows, if any is occupied; its time is charged to the sessions in them."""
        if not any(map(run.batch.occupied, range(self.cfg.rows))):
            return False
        running = [i for i in run.batch.slot if i is not None]
        t0 = time.perf_counter()
        run.batch.decode(self.life.generation_inputs(), self.base_slot)
        seconds = time.perf_counter() - t0
        self.stats.decode_s += seconds
        run.charge(running, seconds)
        return True

    def _update(self, run: _Run, decoded: bool) -> None:
        """Judge the stopped rows, deliver finished host jobs and start new ones; run a Weights bucket when it
        is full or a row would decode empty, else wait for a host job when nothing else can move."""
        if decoded:
            self._collect(run)
        for stream, future in [job for job in run.host_jobs if job[1].done()]:
            run.host_jobs.remove((stream, future))
            results, seconds = future.result()
            run.charge(list(results), seconds)
            self._deliver(run, stream, results, seconds)
        self._start_host_jobs(run)
        occupied = [run.batch.occupied(row) for row in range(self.cfg.rows)]
        nothing_ready = not run.ready and not run.text_ready and not (run.free and self.life.admissible())
        idle = nothing_ready and not any(occupied)
        # A row that nothing can fill would decode empty: the queued Weights step goes first, so that its
        # sessions fill it (beside other methods' sessions, the bucket may never fill).
        if run.weights_queue and (len(run.weights_queue) >= self.cfg.rows or (nothing_ready and not all(occupied))):
            self._weights_step(run)
        elif idle and run.host_jobs:
            self.wake.wait()  # for a host job to finish or to ask for text
            self.wake.clear()

    def _start_text(self, batch: DecodeBatch, row: int, request: _TextRequest, j: int) -> None:
        """Put prompt j of a text request into `row`, on the base weights."""
        seed = 0 if request.seeds is None else request.seeds[j]
        batch.prefill(row, self.base_slot, request.prompts[j], jax.random.key(seed), self.life.generation_inputs(),
                      limit=request.max_tokens, greedy=request.seeds is None, text=True)
        jax.block_until_ready(batch.device.length)
        batch.text[row] = (request, j)

    def _start_turn(self, run: _Run, row: int, i: int) -> None:
        s = run.sessions[i]
        t0 = time.perf_counter()
        run.prompts[i] = self.life.prompt_ids(s)
        s.turn += 1
        run.batch.prefill(row, i, run.prompts[i], jax.random.key(session_seed(self.cfg.seed, s.problem.id, s.turn)),
                          self.life.generation_inputs())
        jax.block_until_ready(run.batch.device.length)  # so that prefill time is not billed to the next decode call
        run.batch.slot[row] = i
        run.turn_start[i] = time.perf_counter()
        self.stats.prefill_s += run.turn_start[i] - t0
        run.charge([i], run.turn_start[i] - t0)

    def _collect(self, run: _Run) -> None:
        """Judge the rows that stopped; end, or start the streams of, their sessions."""
        life, batch = self.life, run.batch
        num_layers = life.model.cfg.num_layers
        gens, rows = {}, {}
        for row, tokens, finish in batch.stopped():
            if batch.text[row] is not None:
                request, j = batch.text[row]
                batch.text[row] = None
                request.gens[j] = Generation(tokens, finish, len(request.prompts[j]))
                batch.keep_text(row, request.prompts[j])
                self.stats.text_generated += len(tokens)
                if None not in request.gens:
                    request.future.set_result(request.gens)
                continue
            i = batch.slot[row]
            gens[i] = Generation(tokens, finish, len(run.prompts[i]))
            rows[i] = row
            batch.slot[row] = None
        if not gens:
            return
        now = time.perf_counter()
        ended, failed = life.judge({i: run.sessions[i] for i in gens}, {i: run.prompts[i] for i in gens}, gens)
        timing = {i: {"generate_s": now - run.turn_start.pop(i), "update_s": 0.0, "words_s": 0.0} for i in gens}
        for i in ended:
            life.advance({i: run.sessions[i]}, [i], [], timing[i])
            batch.kept.pop(i, None)
            life.finished(run.sessions.pop(i), run.on_finish)
            run.free.append(i)
        host: dict[Stream, dict[int, Failure]] = {}
        for i, f in failed.items():
            streams = life.streams_after(f.session)
            changed = min((st.first_changed_layer for st in streams if st.changes_weights), default=num_layers)
            if changed > 0:  # the cache stays valid for the next turn, below the layers a Weights step changes
                batch.keep(i, rows[i], run.prompts[i] + f.tokens, changed if changed < num_layers else None)
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

    def _start_host_jobs(self, run: _Run) -> None:
        """Start each host stream's queued failures as one job. A text model apart from the policy has one job in
        flight per stream: failures that arrive while it runs wait and go together in the next, so that it
        generates for many sessions at once (about the cost of one on a memory-bound decode) instead of one after
        another. The policy's own critic decodes in the rows, which batch every job's requests, so its jobs
        start at once."""
        busy = set() if self.text_in_rows else {st for st, _ in run.host_jobs}
        for st in [st for st in run.host_queue if st not in busy]:
            future = st.start(run.host_queue.pop(st))
            future.add_done_callback(lambda _: self.wake.set())
            run.host_jobs.append((st, future))

    def _deliver(self, run: _Run, stream: Stream, results: dict[int, Any], seconds: float) -> None:
        """Hand a stream's results to their waiting sessions; those with every result go on."""
        for i, result in results.items():
            w = run.waiting[i]
            w.results[stream] = result
            w.timing[stream.timing_key] += seconds
            if len(w.results) == len(w.streams):
                self._resume(run, i)

    def _resume(self, run: _Run, i: int) -> None:
        """Session i has every stream result: write them (in the turn engine's order) and the next message."""
        w = run.waiting.pop(i)
        order = sorted(w.results, key=lambda st: st.on_device)
        self.life.advance({i: run.sessions[i]}, [], [(st, {i: w.results[st]}) for st in order], w.timing)
        run.ready.append(i)
        self.life.ready(i, run.sessions[i], run.on_ready)

    def _weights_step(self, run: _Run) -> None:
        bucket = dict(list(run.weights_queue.items())[: self.cfg.rows])
        for i in bucket:
            del run.weights_queue[i]
        stream = next(st for st in self.life.streams.values() if st.on_device)
        results, seconds = stream.start(bucket).result()
        for i in bucket:
            run.batch.refresh(i, stream.layer_inputs.pop(i, None))
        self.stats.update_s += seconds
        self.stats.updates += 1
        run.charge(list(bucket), seconds)
        self._deliver(run, stream, results, seconds)
