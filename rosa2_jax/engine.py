"""The co-adaptation engine (ROSA2 Algorithm 1) over many problems with a fixed number of session slots.

Each slot holds one problem's history, adapter and turn counter. A step runs four phases for every
occupied slot: answer (one batched generation), judge (verify and record the turn), adapt (the method's
streams on the failed sessions: Words on a worker thread while the Weights step runs on the device) and
advance (write the streams' results and the next user message). A slot is refilled as soon as its session
ends (solved, or K turns), so the batch stays full.

A method is a row of `methods.METHODS`: the streams (`methods.Stream` subclasses) it runs after a failed
turn. Each session carries its method, so one engine can run several methods' sessions side by side.

Every random choice of a session (adapter init, sampling) is seeded from (seed, problem id, turn), so a
problem's trajectory does not depend on which slot it lands in or what else shares its batch.

Between two turns a session is whole in `Session.snapshot()` (JSON): a run can be stopped anywhere and its
sessions in flight go on from their last finished turn (`run(on_ready=)`, `Session.from_snapshot`). A
snapshot holds no adapter: the Weights steps are run again from the judged tokens it keeps (`_replay`), which
costs a step each instead of megabytes of LoRA factors per session. With `adapter_cache` (a folder of this
machine) each session's adapter is also saved after its Weights steps, and a restore on the same machine
loads it instead of replaying.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
import warnings
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from rosa2_jax.adapt.rosa import RosaConfig
from rosa2_jax.adapt.text_models import LocalTextModel, TextModel
from rosa2_jax.adapt.words import FEEDBACK_TEMPLATE, REFERENCES, RETRIES
from rosa2_jax.checkpoint import LoadedModel
from rosa2_jax.methods import ADAPTERS, METHODS, Failure, Stream, Weights, session_seed
from rosa2_jax.model.generation import Generation, SamplingConfig
from rosa2_jax.model.lora import LoraConfig
from rosa2_jax.tasks.data import Problem
from rosa2_jax.tasks.judge import judge_rewards
from rosa2_jax.tasks.records import ProblemRecord, TurnRecord
from rosa2_jax.tasks.rewards import verify

REWARDS = ("rule", "model")  # the verifier's +1/-1, or a text model's judgement (tasks/judge.py)
MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."



@dataclasses.dataclass(frozen=True)
class EngineConfig:
    method: str
    max_turns: int = 10
    slots: int = 8
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=512)
    rosa: RosaConfig = RosaConfig()
    lora: LoraConfig = LoraConfig()
    adapter: str = "lora"  # what the Weights stream adapts (ADAPTERS)
    system_prompt: str = MATH_SYSTEM_PROMPT
    feedback: str = FEEDBACK_TEMPLATE  # the raw x_{t+1}, the same for every method
    switch_turn: int = 5  # `switch`: first axis before this turn, the other from it on
    switch_first: str = "words"
    seed: int = 0
    equivalence: str = "math-verify"
    boxed_only: bool = True  # count only a \boxed{} answer, as the paper's rule-based reward does
    reward: str = "rule"  # what the method acts on (REWARDS); accuracy is always the rule verifier's
    critic_tokens: int = 64  # the Words step's critique budget (two lines)
    rewrite_tokens: int = 64  # and each instruction candidate's
    words_retries: int = RETRIES  # sampled candidates after a refused one (adapt/words.py)
    critic_reference: str = "none"  # what the critic sees of the reference (REFERENCES)
    max_context: int | None = None  # default: the model's window
    # the token-level engine (scheduler.TokenEngine); the turn engine ignores these
    sessions: int = 0  # sessions in the pool (0: twice `slots`)
    decode_steps: int = 16  # most tokens decoded per device call (a call also ends when a row stops)
    prefill_chunk: int = 512  # longest piece of a prompt prefilled in one call

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {tuple(METHODS)}")
        if self.switch_first not in ("words", "weights"):
            raise ValueError("switch_first must be words or weights")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {self.adapter!r}; choose from {tuple(ADAPTERS)}")
        if self.critic_reference not in REFERENCES:
            raise ValueError(f"unknown critic reference {self.critic_reference!r}; choose from {REFERENCES}")
        if self.reward not in REWARDS:
            raise ValueError(f"unknown reward {self.reward!r}; choose from {REWARDS}")


@dataclasses.dataclass
class Session:
    problem: Problem
    method: str
    system_prompt: str
    messages: list[dict] = dataclasses.field(default_factory=list)  # user/assistant turns, system prompt apart
    turn: int = 0
    solved_at: int | None = None
    previous_feedback: str | None = None
    turns: list[TurnRecord] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    response_ids: list[list[int]] = dataclasses.field(default_factory=list)  # each judged turn's tokens
    restored: bool = False  # from a snapshot: its adapter is rebuilt (`SessionEngine._replay`) when admitted

    def record(self, dataset: str) -> ProblemRecord:
        return ProblemRecord(self.method, dataset, self.problem.id, self.problem.answer, self.solved_at, self.turns,
                             self.seconds, self.error)

    def snapshot(self) -> dict[str, Any]:
        """The session between two turns, as JSON: everything its next turns depend on."""
        return {"method": self.method, "problem_id": self.problem.id, "system_prompt": self.system_prompt,
                "messages": [dict(m) for m in self.messages], "turn": self.turn, "solved_at": self.solved_at,
                "previous_feedback": self.previous_feedback, "turns": [t.to_json() for t in self.turns],
                "seconds": self.seconds, "response_ids": [list(ids) for ids in self.response_ids]}

    @classmethod
    def from_snapshot(cls, row: dict[str, Any], problem: Problem) -> "Session":
        if row["problem_id"] != problem.id:
            raise ValueError(f"a snapshot of problem {row['problem_id']!r} cannot restore problem {problem.id!r}")
        return cls(problem, row["method"], row["system_prompt"], [dict(m) for m in row["messages"]], row["turn"],
                   row["solved_at"], row["previous_feedback"], [TurnRecord.from_json(t) for t in row["turns"]],
                   row["seconds"], response_ids=[list(ids) for ids in row["response_ids"]], restored=True)


def _step_norms(s: Session) -> np.ndarray:
    """||Δθ||² of each Weights step `s` took so far: what its adapter is the result of."""
    return np.asarray([t.update["step_norm_sq"] for t in s.turns if t.update is not None], np.float64)


Work = Problem | tuple[str, Problem] | Session  # a problem run with `EngineConfig.method`, (method, problem), or a
# session restored from its snapshot


def method_of(item: tuple[str, Problem] | Session) -> str:
    """The method a queued (method, problem) pair or restored session runs."""
    return item.method if isinstance(item, Session) else item[0]


# ---------------------------------------------------------------------- the engine
class SessionEngine:
    """Runs `cfg.method` over problems, or any methods given with them (`Work`). On a mesh (the one `model` was
    loaded onto, load_model(mesh=)) the slots are split over its `data` axis: `cfg.slots` must be a multiple
    of it."""

    def __init__(self, model: LoadedModel, cfg: EngineConfig, text_model: TextModel | None = None,
                 adapter_cache: Path | None = None):
        self.model, self.cfg, self.text_model = model, cfg, text_model
        self.adapter_cache = adapter_cache  # where each session's adapter is saved after its Weights steps
        # What the Words streams call: a local text model samples its retries as the policy does (the token engine
        # also decodes it in its rows).
        self.words_model = (text_model.replace(sampling=cfg.sampling) if isinstance(text_model, LocalTextModel)
                            else text_model)
        self.sampler = model.sampler
        self.mesh = model.mesh
        self.data = self.mesh.shape["data"] if self.mesh is not None else 1  # devices the slots are split over
        if cfg.slots % self.data:
            raise ValueError(f"slots={cfg.slots} must be a multiple of the mesh's data axis ({self.data})")
        if cfg.reward == "model" and text_model is None:
            raise ValueError("the model-based reward needs a text model to judge the answers")
        self.pool_size = self._pool_size()
        self.window = -(-cfg.sampling.max_new_tokens // cfg.rosa.position_chunk) * cfg.rosa.position_chunk
        self.max_prompt = (cfg.max_context or model.cfg.max_position_embeddings) - cfg.sampling.max_new_tokens
        self.pool = ThreadPoolExecutor(max_workers=self._host_workers(), thread_name_prefix="words")
        self.streams: dict[type[Stream], Stream] = {}
        self._add_streams(cfg.method)
        self.queue: deque[tuple[str, Problem] | Session] = deque()  # the running run's work not admitted yet
        self.restoring: dict[int, Session] = {}  # restored sessions admitted since the last `_replay`
        # Cleared by stop_admitting and never set again, so a stop that comes before `run` also holds.
        self.admitting = True

    def _add_streams(self, method: str) -> None:
        """Create the streams `method` runs that this engine does not have yet."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {tuple(METHODS)}")
        kinds = METHODS[method].all_streams(self.cfg)
        if any(k.needs_text_model for k in kinds) and self.text_model is None:
            raise ValueError(f"method {method!r} needs a text model")
        for kind in kinds:
            if kind not in self.streams:
                self.streams[kind] = kind.create(self)

    def _streams_after(self, s: Session) -> set[Stream]:
        """The streams that adapt session `s` after its failed current turn."""
        return {self.streams[kind] for kind in METHODS[s.method].streams_at(s.turn, self.cfg)}

    def _work(self, items: Iterable[Work]) -> deque[tuple[str, Problem] | Session]:
        """(method, problem) pairs and restored sessions, every method's streams created before the run starts."""
        work = deque(item if isinstance(item, (tuple, Session)) else (self.cfg.method, item) for item in items)
        for method in dict.fromkeys(map(method_of, work)):
            self._add_streams(method)
        return work

    def _pool_size(self) -> int:
        """Sessions held at once (the streams keep this many adapters): here one per slot."""
        return self.cfg.slots

    def _host_workers(self) -> int:
        """Worker threads for the host streams' jobs: one, since each job's text model batches its sessions."""
        return 1

    def _prompt_ids(self, s: Session) -> list[int]:
        """Chat-template ids; over the budget, drop the oldest (assistant, user) exchanges, never x_1."""
        messages = list(s.messages)
        while True:
            ids = self.sampler.render([{"role": "system", "content": s.system_prompt}] + messages)
            if len(ids) <= self.max_prompt or len(messages) < 3:
                return ids
            messages = messages[:1] + messages[3:]

    def _failure_at(self, s: Session, record: TurnRecord) -> Failure | None:
        """`s`'s failed turn `record.turn` as its Weights step saw it: the prompt rendered again from the history
        up to that turn (the same ids: the same messages through the same template), the judged tokens as kept.
        None if the prompt does not render to its record's length."""
        t = record.turn
        prompt = self._prompt_ids(dataclasses.replace(s, messages=s.messages[: 2 * t - 1],
                                                      system_prompt=record.system_prompt))
        if len(prompt) != record.prompt_tokens or len(s.response_ids) < t:
            return None
        return Failure(s, prompt, s.response_ids[t - 1], record.response, None)

    def _replay(self) -> None:
        """Rebuild the adapters of the sessions restored since the last call: their Weights steps again, in turn
        order (round k runs every session's k-th step, in buckets of `slots`). Each step is checked against its
        record (its prompt's length, ‖Δθ‖² to 1%): a session whose snapshot does not replay here (other code,
        another machine's rounding in a step's safeguard) starts again from turn 1 with a warning, so that no
        session goes on from a wrong adapter."""
        if not self.restoring:
            return
        restored, self.restoring = self.restoring, {}
        stream = self._weights()
        restored = {i: s for i, s in restored.items() if stream is None or not self._load_adapter(stream, i, s)}
        steps = {i: [t for t in s.turns if t.update is not None] for i, s in restored.items()}
        for k in range(max(map(len, steps.values()), default=0)):
            due = {i: (steps[i][k], self._failure_at(restored[i], steps[i][k])) for i in steps if len(steps[i]) > k}
            for i in [i for i, (t, f) in due.items() if f is None]:
                self._start_over(i, restored[i], f"turn {due.pop(i)[0].turn}'s prompt renders to another length")
                del steps[i]
            items = list(due.items())
            for start in range(0, len(items), self.cfg.slots):
                bucket = dict(items[start: start + self.cfg.slots])
                results, _ = stream.start({i: f for i, (_, f) in bucket.items()}).result()
                for i, (t, _) in bucket.items():
                    again, then = results[i]["step_norm_sq"], t.update["step_norm_sq"]
                    if not np.isclose(again, then, rtol=1e-2, atol=1e-8):
                        self._start_over(i, restored[i], f"turn {t.turn}'s Weights step gives ||Δθ||² {again:.4g} "
                                                         f"again, {then:.4g} in its record")
                        del steps[i]

    def _weights(self) -> Weights | None:
        return next((st for st in self.streams.values() if isinstance(st, Weights)), None)

    def _adapter_path(self, s: Session) -> Path | None:
        if self.adapter_cache is None:
            return None
        return self.adapter_cache / re.sub(r"[^\w.-]", "_", f"{s.method}--{s.problem.id}.npz")

    def _ready(self, slot: int, s: Session, on_ready: Callable[[Session], None]) -> None:
        """Session `s` failed a turn and has its next message: save its adapter if a Weights step just moved it
        (with the ||Δθ||² of every step so far, which a restore checks against the snapshot), then `on_ready`."""
        path = self._adapter_path(s)
        if path is not None and s.turns[-1].update is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial.npz")
            np.savez(partial, **self._weights().state(slot), step_norms_sq=_step_norms(s))
            os.replace(partial, path)
        on_ready(s)

    def _finished(self, s: Session, on_finish: Callable[[Session], None]) -> None:
        on_finish(s)
        if (path := self._adapter_path(s)) is not None:
            path.unlink(missing_ok=True)

    def _load_adapter(self, stream: Weights, slot: int, s: Session) -> bool:
        """Put restored session `s`'s saved adapter into `slot`, if one was saved after the same steps."""
        path = self._adapter_path(s)
        if path is None or not path.exists() or not any(t.update is not None for t in s.turns):
            return False
        try:
            with np.load(path) as saved:
                state = {k: saved[k] for k in saved.files}
            if not np.array_equal(state.pop("step_norms_sq"), _step_norms(s)):
                return False
            stream.load_state(slot, state)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # a torn or foreign file: replay instead
            return False
        return True

    def _start_over(self, slot: int, s: Session, why: str) -> None:
        """Put restored session `s` back to its first turn, in place (the engine holds it by slot)."""
        warnings.warn(f"restoring {s.method} on {s.problem.id}: {why}; the session starts again from turn 1",
                      RuntimeWarning, stacklevel=2)
        fresh = self._new_session(s.method, s.problem)
        for field in dataclasses.fields(Session):
            setattr(s, field.name, getattr(fresh, field.name))
        for stream in self.streams.values():
            stream.reset(slot, s)

    def _generation_inputs(self) -> dict[str, Any]:
        """The streams' per-session state the policy generates with (adapters, hidden_offset)."""
        return {k: v for stream in self.streams.values() for k, v in stream.generation_inputs().items()}

    # ------------------------------------------------------------------ the four phases of a step
    def answer(self, slots: dict[int, Session], prompts: dict[int, list[int]]) -> dict[int, Generation]:
        rows = [prompts.get(i, [self.sampler.pad_id]) for i in range(self.cfg.slots)]
        seeds = [session_seed(self.cfg.seed, s.problem.id, s.turn) if (s := slots.get(i)) else 0
                 for i in range(self.cfg.slots)]
        gens = self.sampler.generate(rows, self.cfg.sampling, seeds=seeds, **self._generation_inputs())
        return {i: gens[i] for i in slots}

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
        wanted = {i: self._streams_after(f.session) for i, f in failed.items()}
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

    def step(self, slots: dict[int, Session]) -> list[int]:
        """One turn for every occupied slot; returns the slots whose session ended."""
        step_start = time.perf_counter()
        prompts = {i: self._prompt_ids(s) for i, s in slots.items()}
        for s in slots.values():
            s.turn += 1
        t0 = time.perf_counter()
        gens = self.answer(slots, prompts)
        generate_s = time.perf_counter() - t0
        ended, failed = self.judge(slots, prompts, gens)
        outcomes, timing = self.adapt(failed)
        self.advance(slots, ended, outcomes, {"generate_s": generate_s} | timing)
        share = (time.perf_counter() - step_start) / max(len(slots), 1)
        for s in slots.values():
            s.seconds += share
        return ended

    # ------------------------------------------------------------------ the whole run
    def _new_session(self, method: str, problem: Problem) -> Session:
        return Session(problem, method, self.cfg.system_prompt, [{"role": "user", "content": problem.question}])

    def _admit(self, slot: int, item: tuple[str, Problem] | Session) -> Session:
        """A new or restored session in `slot`; a new one's `error` is set instead when its first turn cannot
        fit. Every stream resets its state of the slot, so a session never inherits the adapter of another
        method's session; a restored one's is rebuilt by the next `_replay`."""
        if isinstance(item, Session):
            s = self.restoring[slot] = item
        else:
            s = self._new_session(*item)
            needed = len(self._prompt_ids(s))
            if needed > self.max_prompt:  # later turns trim down to x_1, so only x_1 can overflow
                s.error = (f"context overflow: the first turn needs {needed} tokens, the budget is "
                           f"{self.max_prompt} (context minus max_new_tokens); raise --max_context or lower "
                           "--max_new_tokens")
                return s
        for stream in self.streams.values():
            stream.reset(slot, s)
        return s

    def stop_admitting(self) -> None:
        """Admit no more problems, now or in a later `run`: `run` returns once the sessions in flight have
        finished, leaving the problems it did not admit in `self.queue` (safe from a signal handler)."""
        self.admitting = False

    def _admissible(self) -> bool:
        """Whether the running run has problems left to admit."""
        return bool(self.queue) and self.admitting

    def run(self, problems: Iterable[Work], on_finish: Callable[[Session], None],
            on_ready: Callable[[Session], None] = lambda s: None) -> None:
        """Every problem to its end: `on_finish` gets each ended session, `on_ready` each session that failed a
        turn and is ready for the next (where its snapshot can be taken)."""
        queue = self.queue = self._work(problems)
        slots: dict[int, Session] = {}
        while self._admissible() or slots:
            for i in range(self.cfg.slots):
                while i not in slots and self._admissible():
                    s = self._admit(i, queue.popleft())
                    if s.error:
                        on_finish(s)
                    else:
                        slots[i] = s
            self._replay()
            if slots:
                ended = self.step(slots)
                for i in ended:
                    self._finished(slots.pop(i), on_finish)
                for i, s in slots.items():
                    self._ready(i, s, on_ready)

    def close(self):
        self.pool.shutdown(wait=True)
