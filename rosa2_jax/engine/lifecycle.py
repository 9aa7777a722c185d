"""The session lifecycle both schedulers share (ROSA2 Algorithm 1): admit, render the prompt, answer, judge,
adapt, advance.

A session is admitted into a slot of the pool, generates a turn from its prompt (the schedulers decide when
and in which batch), is judged (verify and record the turn), and on a failure gets its method's streams (Words
on a worker thread while the Weights step runs on the device), which write the next user message. A session
ends when it is solved or has had K turns. `Engine` is what a scheduler offers its caller.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

from rosa2_jax.adapt.judge import judge_rewards
from rosa2_jax.adapt.text_models import LocalTextModel, TextModel
from rosa2_jax.checkpoint import LoadedModel
from rosa2_jax.engine.config import EngineConfig
from rosa2_jax.engine.history import fit_prompt, prompt_budget
from rosa2_jax.engine.methods import METHODS
from rosa2_jax.engine.restore import Restore
from rosa2_jax.engine.session import Failure, Session, Work, method_of
from rosa2_jax.engine.streams import Stream, StreamContext, Weights
from rosa2_jax.model.generation import Generation
from rosa2_jax.tasks.problem import Problem
from rosa2_jax.tasks.records import TurnRecord
from rosa2_jax.tasks.rewards import verify

Queued = tuple[str, Problem] | Session  # a (method, problem) pair not admitted yet, or a restored session


def data_shards(model: LoadedModel) -> int:
    """Devices the sessions are split over: the `data` axis of the mesh the model was loaded onto."""
    return model.mesh.shape["data"] if model.mesh is not None else 1


def words_model(text_model: TextModel | None, cfg: EngineConfig) -> TextModel | None:
    """What the Words streams call: a local text model samples its retries as the policy does."""
    return text_model.replace(sampling=cfg.sampling) if isinstance(text_model, LocalTextModel) else text_model


class Lifecycle:
    """The sessions' state machine over a pool of `pool_size` slots, whatever schedules their turns. On a mesh
    the pool slots are split over its `data` axis: `cfg.rows` must be a multiple of it."""

    def __init__(self, model: LoadedModel, cfg: EngineConfig, text_model: TextModel | None, *, pool_size: int,
                 host_workers: int, words: TextModel | None, adapter_cache: Path | None = None):
        self.model, self.cfg, self.text_model = model, cfg, text_model
        self.sampler = model.sampler
        self.data_shards = data_shards(model)
        if cfg.rows % self.data_shards:
            raise ValueError(f"rows={cfg.rows} (--slots) must be a multiple of the mesh's data axis "
                             f"({self.data_shards})")
        if cfg.reward == "model" and text_model is None:
            raise ValueError("the model-based reward needs a text model to judge the answers")
        self.max_prompt = prompt_budget(cfg.max_context, model.cfg.max_position_embeddings,
                                        cfg.sampling.max_new_tokens)
        self.executor = ThreadPoolExecutor(max_workers=host_workers, thread_name_prefix="words")
        chunk = cfg.rosa.position_chunk
        self.ctx = StreamContext(cfg, model, pool_size, self.data_shards, -(-cfg.sampling.max_new_tokens // chunk) * chunk,
                                 words, self.executor.submit, METHODS)
        self.streams: dict[type[Stream], Stream] = {}
        self.add_streams(cfg.method)
        self.restore = Restore(self, adapter_cache)
        self.queue: deque[Queued] = deque()  # the running run's work not admitted yet
        # Cleared by stop_admitting and never set again, so a stop that comes before `run` also holds.
        self.admitting = True

    # ------------------------------------------------------------------ streams
    def add_streams(self, method: str) -> None:
        """Create the streams `method` runs that are not there yet."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {tuple(METHODS)}")
        kinds = METHODS[method].all_streams(self.cfg)
        if any(k.needs_text_model for k in kinds) and self.text_model is None:
            raise ValueError(f"method {method!r} needs a text model")
        for kind in kinds:
            if kind not in self.streams:
                self.streams[kind] = kind.create(self.ctx)

    def streams_after(self, s: Session) -> set[Stream]:
        """The streams that adapt session `s` after its failed current turn."""
        return {self.streams[kind] for kind in METHODS[s.method].streams_at(s.turn, self.cfg)}

    def weights(self) -> Weights | None:
        return next((st for st in self.streams.values() if isinstance(st, Weights)), None)

    def generation_inputs(self) -> dict[str, Any]:
        """The streams' per-session state the policy generates with (adapters, hidden_offset)."""
        return {k: v for stream in self.streams.values() for k, v in stream.generation_inputs().items()}

    # ------------------------------------------------------------------ admission
    def start(self, items: Iterable[Work]) -> deque[Queued]:
        """A run's work as (method, problem) pairs and restored sessions (`self.queue`), every method's streams
        created before the run starts."""
        work = deque(item if isinstance(item, (tuple, Session)) else (self.cfg.method, item) for item in items)
        for method in dict.fromkeys(map(method_of, work)):
            self.add_streams(method)
        self.queue = work
        return work

    def new_session(self, method: str, problem: Problem) -> Session:
        return Session(problem, method, self.cfg.system_prompt, [{"role": "user", "content": problem.question}])

    def admit(self, slot: int, item: Queued) -> Session:
        """A new or restored session in `slot`; a new one's `error` is set instead when its first turn cannot
        fit. Every stream resets its state of the slot, so a session never inherits the adapter of another
        method's session; a restored one's is rebuilt by the next `Restore.replay`."""
        if isinstance(item, Session):
            s = self.restore.pending[slot] = item
        else:
            s = self.new_session(*item)
            needed = len(self.prompt_ids(s))
            if needed > self.max_prompt:  # later turns trim down to x_1, so only x_1 can overflow
                s.error = (f"context overflow: the first turn needs {needed} tokens, the budget is "
                           f"{self.max_prompt} (context minus max_new_tokens); raise --max_context or lower "
                           "--max_new_tokens")
                return s
        for stream in self.streams.values():
            stream.reset(slot, s)
        return s

    def stop_admitting(self) -> None:
        """Admit no more problems, now or in a later run: the run returns once the sessions in flight have
        finished, leaving the problems it did not admit in `self.queue` (safe from a signal handler)."""
        self.admitting = False

    def admissible(self) -> bool:
        """Whether the running run has problems left to admit."""
        return bool(self.queue) and self.admitting

    # ------------------------------------------------------------------ a turn
    def prompt_ids(self, s: Session) -> list[int]:
        """Chat-template ids; over the budget, the history trimmed oldest first (`history.fit_prompt`)."""
        return fit_prompt(self.sampler.render, s.system_prompt, s.messages, self.max_prompt)

    def judge(self, slots: dict[int, Session], prompts: dict[int, list[int]],
              gens: dict[int, Generation]) -> tuple[list[int], dict[int, Failure]]:
        """Verify every answer and record the turn; returns the ended slots and the failures to adapt.

        The rule-based verifier decides `solved_at` (accuracy). The method acts on `cfg.reward`: the same
        verdict, or with "model" the text model's judgement (a session it calls right ends, one it calls
        wrong is adapted, whatever the rule says)."""
        texts = {i: self.sampler.decode(gens[i].tokens) for i in slots}
        rule = {i: verify(s.problem, texts[i], equivalence=self.cfg.equivalence, boxed_only=self.cfg.boxed_only)
                for i, s in slots.items()}
        acted = rule
        if self.cfg.reward == "model":
            acted = dict(zip(slots, judge_rewards(self.text_model, [(s.problem, texts[i]) for i, s in slots.items()])))
        ended, failed = [], {}
        for i, s in slots.items():
            verdict = rule[i]
            s.response_ids.append(list(gens[i].tokens))
            s.turns.append(TurnRecord(turn=s.turn, user=s.messages[-1]["content"], system_prompt=s.system_prompt,
                                      response=texts[i], extracted=verdict.extracted, reward=acted[i].reward,
                                      response_tokens=len(gens[i].tokens), finish_reason=gens[i].finish_reason,
                                      prompt_tokens=len(prompts[i]),
                                      rule_reward=verdict.reward if acted is not rule else None))
            if verdict.reward > 0 and s.solved_at is None:
                s.solved_at = s.turn
            if acted[i].reward > 0 or s.turn >= self.cfg.max_turns:
                ended.append(i)
            else:
                failed[i] = Failure(s, prompts[i], gens[i].tokens, texts[i], verdict)
        return ended, failed

    def adapt(self, failed: dict[int, Failure]) -> tuple[list[tuple[Stream, dict[int, Any]]], dict[str, float]]:
        """Every stream on the failed sessions it applies to. Host streams are submitted first so that they
        run on the worker thread while the device streams run here (Alg. 1 steps A and B)."""
        wanted = {i: self.streams_after(f.session) for i, f in failed.items()}
        joins = []
        for stream in sorted(self.streams.values(), key=lambda st: st.on_device):
            mine = {i: f for i, f in failed.items() if stream in wanted[i]}
            if mine:
                joins.append((stream, stream.start(mine)))
        outcomes, timing = [], {"update_s": 0.0, "words_s": 0.0}
        for stream, future in joins:
            results, seconds = future.result()
            outcomes.append((stream, results))
            timing[stream.timing_key] += seconds
        return outcomes, timing

    def advance(self, slots: dict[int, Session], ended: list[int], outcomes: list[tuple[Stream, dict[int, Any]]],
                timing: dict[str, float]) -> None:
        """Write each stream's result into its session and turn record, then the next user message."""
        for i, s in slots.items():
            record = s.turns[-1]
            record.timing = dict(timing)
            if i in ended:
                continue
            message = self.cfg.feedback
            for stream, results in outcomes:
                if i in results:
                    message = stream.apply(s, record, results[i], message)
            if not METHODS[s.method].fresh:
                s.messages += [{"role": "assistant", "content": record.response}, {"role": "user", "content": message}]

    def ready(self, slot: int, s: Session, on_ready: Callable[[Session], None]) -> None:
        """Session `s` failed a turn and has its next message (where its snapshot can be taken)."""
        self.restore.save(slot, s)
        on_ready(s)

    def finished(self, s: Session, on_finish: Callable[[Session], None]) -> None:
        on_finish(s)
        self.restore.drop(s)

    def close(self) -> None:
        self.executor.shutdown(wait=True)


class Engine:
    """What a scheduler offers: `run` every problem to its end, `stop_admitting` (the rest stays in `queue`),
    `close`; a context manager that closes."""

    life: Lifecycle

    def run(self, problems: Iterable[Work], on_finish: Callable[[Session], None],
            on_ready: Callable[[Session], None] = lambda s: None) -> None:
        """Every problem to its end: `on_finish` gets each ended session, `on_ready` each session that failed a
        turn and is ready for the next (where its snapshot can be taken)."""
        raise NotImplementedError

    @property
    def cfg(self) -> EngineConfig:
        return self.life.cfg

    @property
    def queue(self) -> deque[Queued]:
        return self.life.queue

    @property
    def admitting(self) -> bool:
        return self.life.admitting

    def stop_admitting(self) -> None:
        self.life.stop_admitting()

    def close(self) -> None:
        self.life.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

