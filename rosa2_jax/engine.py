"""The co-adaptation engine (ROSA2 Algorithm 1) over many problems with a fixed number of session slots.

Each slot holds one problem's history, adapter and turn counter. A step runs four phases for every
occupied slot: answer (one batched generation), judge (verify and record the turn), adapt (the method's
streams on the failed sessions: Words on a worker thread while the Weights step runs on the device) and
advance (write the streams' results and the next user message). A slot is refilled as soon as its session
ends (solved, or K turns), so the batch stays full.

A method is a row of `METHODS`: the streams (`Stream` subclasses) it runs after a failed turn. A new kind
of adaptation is one `Stream` class and one row.

Every random choice of a session (adapter init, sampling) is seeded from (seed, problem id, turn), so a
problem's trajectory does not depend on which slot it lands in or what else shares its batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rosa2_jax.adapt.rosa import RosaConfig, UpdateBatch, UpdateStats, hidden_offset_update, rosa_update
from rosa2_jax.adapt.text_models import TextModel
from rosa2_jax.adapt.words import FEEDBACK_TEMPLATE, RefineRequest, RefineResult, refine_feedback, refine_system_prompt
from rosa2_jax.checkpoint import LoadedModel
from rosa2_jax.model.generation import Generation, SamplingConfig, bucket_length, left_pad
from rosa2_jax.model.lora import LoraConfig, init_adapters, parse_layers
from rosa2_jax.model.sharding import shard_batch
from rosa2_jax.tasks.data import Problem
from rosa2_jax.tasks.judge import judge_rewards
from rosa2_jax.tasks.records import ProblemRecord, TurnRecord
from rosa2_jax.tasks.rewards import Verdict, verify

HIDDEN_OFFSET_TOP_K = 64  # support of the d x d head metric the offset step forms when rosa.head_top_k is 0 (exact)
UPDATE_STATS = ("step_norm_sq", "residual_norm", "cg_rel_residual", "kl_before", "kl_after", "logp_before",
                "logp_after", "damping")
REWARDS = ("rule", "model")  # the verifier's +1/-1, or a text model's judgement (tasks/judge.py)
MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclasses.dataclass(frozen=True)
class WeightsPreset:
    """How the Weights stream is run: what it adapts and how exactly it solves (BUILD_NOTES.md, issue 10)."""

    adapter: str  # one of ADAPTERS
    lora_layers: str  # all | last:N | I-J (lora.parse_layers)
    lora_targets: tuple[str, ...]  # LoraConfig.targets
    head_top_k: int  # RosaConfig.head_top_k (0 = exact head metric)
    cg_iters: int
    backtrack: int  # RosaConfig.backtrack (0 = the plain step)
    max_step_norm: float  # RosaConfig.max_step_norm, the trust region on ||Δθ||

    def rosa(self, **fields) -> RosaConfig:
        """This preset's RosaConfig; `fields` set the others (beta, tilt, remat, ...)."""
        return RosaConfig(cg_iters=self.cg_iters, head_top_k=self.head_top_k, backtrack=self.backtrack,
                          max_step_norm=self.max_step_norm, **fields)

    def lora(self, num_layers: int, **fields) -> LoraConfig:
        """This preset's LoraConfig for a `num_layers`-layer model; `fields` set rank and alpha."""
        return LoraConfig(targets=tuple(self.lora_targets), layers=parse_layers(self.lora_layers, num_layers), **fields)


PRESETS = {
    "paper": WeightsPreset("lora", "all", ("q", "v"), 0, 10, 0, 1.0),  # spec 1.3-1.4: exact head, 10 CG iterations
    # BUILD_NOTES.md (Fast Weights): 0.82x the turn's generation, 97% of the paper step's KL reduction
    "fast": WeightsPreset("lora", "last:8", ("q", "k", "v", "o", "gate", "up", "down"), 64, 4, 3, 10.0),
}


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
    critic_tokens: int = 512
    rewrite_tokens: int = 256
    max_context: int | None = None  # default: the model's window

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {tuple(METHODS)}")
        if self.switch_first not in ("words", "weights"):
            raise ValueError("switch_first must be words or weights")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {self.adapter!r}; choose from {tuple(ADAPTERS)}")
        if self.reward not in REWARDS:
            raise ValueError(f"unknown reward {self.reward!r}; choose from {REWARDS}")

    def streams(self, turn: int) -> tuple[type["Stream"], ...]:
        """The streams that adapt a session after it failed `turn`."""
        return METHODS[self.method].streams_at(turn, self)


def session_seed(seed: int, problem_id: str, turn: int) -> int:
    digest = hashlib.sha256(f"{seed}/{problem_id}/{turn}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclasses.dataclass
class Session:
    problem: Problem
    system_prompt: str
    messages: list[dict] = dataclasses.field(default_factory=list)  # user/assistant turns, system prompt apart
    turn: int = 0
    solved_at: int | None = None
    previous_feedback: str | None = None
    turns: list[TurnRecord] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def record(self, method: str, dataset: str) -> ProblemRecord:
        return ProblemRecord(method, dataset, self.problem.id, self.problem.answer, self.solved_at, self.turns,
                             self.seconds, self.error)


class Failure(NamedTuple):
    """A session's failed turn, as the streams see it."""

    session: Session
    prompt: list[int]  # the turn's prompt ids
    tokens: list[int]  # the judged response
    response: str
    verdict: Verdict


# ---------------------------------------------------------------------- streams: the kinds of adaptation
class Stream:
    """One kind of adaptation after a failed turn. `start` begins it for the failed sessions and returns a
    function that waits for it and gives each slot's result; `apply` writes a result into the session,
    its turn record, and the next user message."""

    needs_text_model = False
    on_device = False  # device streams run on the engine's thread, after the host ones are submitted
    timing_key = "words_s"

    def __init__(self, engine: "SessionEngine"):
        self.engine = engine

    @classmethod
    def create(cls, engine: "SessionEngine") -> "Stream":
        return cls(engine)

    def reset(self, slot: int, session: Session) -> None:
        """A new session takes `slot`."""

    def generation_inputs(self) -> dict[str, Any]:
        """Per-slot state the policy generates with (generation.generate keyword arguments)."""
        return {}

    def start(self, failed: dict[int, Failure]) -> Callable[[], tuple[dict[int, Any], float]]:
        raise NotImplementedError

    def apply(self, session: Session, record: TurnRecord, result: Any, message: str) -> str:
        raise NotImplementedError


class _Refine(Stream):
    """The TextGrad step on the text model, run on the engine's worker thread."""

    needs_text_model = True
    refine = staticmethod(refine_feedback)

    def current(self, session: Session) -> str:
        return self.engine.cfg.feedback

    def start(self, failed):
        cfg = self.engine.cfg
        requests = [RefineRequest(problem=f.session.problem.question, attempt=f.response,
                                  extracted_answer=f.verdict.extracted, current=self.current(f.session),
                                  previous_feedback=f.session.previous_feedback, ground_truth=f.session.problem.answer)
                    for f in failed.values()]

        def run():
            start = time.perf_counter()
            out = self.refine(self.engine.text_model, requests, critic_tokens=cfg.critic_tokens,
                              rewrite_tokens=cfg.rewrite_tokens)
            return dict(zip(failed, out)), time.perf_counter() - start

        return self.engine.pool.submit(run).result

    @staticmethod
    def write(record: TurnRecord, r: RefineResult) -> None:
        record.refine = {"status": r.status, "critique": r.critique, "message": r.message}
        record.semantic_shift = r.semantic_shift


class Words(_Refine):
    """ROSA2 Words stream: the next user message is critiqued and rewritten."""

    def apply(self, session, record, result, message):
        self.write(record, result)
        session.previous_feedback = result.message
        return result.message


class SystemPrompt(_Refine):
    """The TextGrad baseline: the system prompt is critiqued and rewritten, weights frozen."""

    refine = staticmethod(refine_system_prompt)

    def current(self, session):
        return session.system_prompt

    def apply(self, session, record, result, message):
        self.write(record, result)
        session.system_prompt = result.message or session.system_prompt
        return message


class Weights(Stream):
    """ROSA Weights stream: one vmapped Gauss-Newton step on the failed sessions' adapters. The adapter kind
    is `EngineConfig.adapter` (a row of ADAPTERS)."""

    on_device = True
    timing_key = "update_s"

    @classmethod
    def create(cls, engine):
        return ADAPTERS[engine.cfg.adapter](engine)

    def step(self, batch: UpdateBatch) -> UpdateStats:
        """Update the adapters of the batch's active sessions in place; return per-slot stats."""
        raise NotImplementedError

    def start(self, failed):
        engine = self.engine
        start = time.perf_counter()
        rows, lens = [], []
        for i in range(engine.cfg.slots):
            f = failed.get(i)
            rows.append(f.prompt + f.tokens if f else [engine.sampler.pad_id])
            lens.append(len(f.tokens) if f else 0)
        # Rows of J are only the responses: the window covers the longest one (bucketed, so that a sweep
        # compiles a few programs), not max_new_tokens, when every answer stopped early.
        chunk = engine.cfg.rosa.position_chunk
        window = min(engine.window, -(-bucket_length(max(lens)) // chunk) * chunk)
        length = bucket_length(max(max(len(r) for r in rows), window + 1))  # row 0 of the window needs a predecessor
        tokens, valid = left_pad(rows, length, engine.sampler.pad_id)
        batch = shard_batch(UpdateBatch(jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(np.minimum(lens, window)),
                                        jnp.full((engine.cfg.slots,), -1.0, jnp.float32),
                                        jnp.asarray([i in failed for i in range(engine.cfg.slots)]), window=window),
                            engine.mesh)
        stats = jax.device_get(self.step(batch))
        results = {i: {k: float(np.asarray(getattr(stats, k))[i]) for k in UPDATE_STATS} | {
            "cg_iters": int(stats.cg_iters[i]), "backtracks": int(stats.backtracks[i]),
            "rejected": bool(stats.rejected[i]), "nonfinite": bool(stats.nonfinite[i])} for i in failed}
        seconds = time.perf_counter() - start
        return lambda: (results, seconds)

    def apply(self, session, record, result, message):
        record.update = result
        record.step_norm_sq = result["step_norm_sq"]
        return message


class LoraWeights(Weights):
    """θ = the session's LoRA factors (spec 1.3)."""

    def __init__(self, engine):
        super().__init__(engine)
        cfg = engine.cfg
        self.adapters = shard_batch(init_adapters(engine.model.cfg, cfg.lora, cfg.slots, jax.random.key(cfg.seed)),
                                    engine.mesh)

    def reset(self, slot, session):
        key = jax.random.key(session_seed(self.engine.cfg.seed, session.problem.id, 0))
        fresh = init_adapters(self.engine.model.cfg, self.engine.cfg.lora, 1, key)
        self.adapters = shard_batch(self.adapters.replace(
            factors=jax.tree.map(lambda a, f: a.at[slot].set(f[0]), self.adapters.factors, fresh.factors)),
            self.engine.mesh)

    def generation_inputs(self):
        return {"adapters": self.adapters}

    def step(self, batch):
        self.adapters, stats = rosa_update(self.engine.model.params, self.adapters, batch, cfg=self.engine.model.cfg,
                                           rosa=self.engine.cfg.rosa)
        return stats


class HiddenOffsetWeights(Weights):
    """θ = an offset of the final hidden state on response positions (ROSA's "HS" variant)."""

    def __init__(self, engine):
        super().__init__(engine)
        self.offsets = shard_batch(jnp.zeros((engine.cfg.slots, engine.model.cfg.hidden_size), jnp.float32),
                                   engine.mesh)

    def reset(self, slot, session):
        self.offsets = shard_batch(self.offsets.at[slot].set(0.0), self.engine.mesh)

    def generation_inputs(self):
        return {"hidden_offset": self.offsets}

    def step(self, batch):
        rosa = self.engine.cfg.rosa
        self.offsets, stats = hidden_offset_update(self.engine.model.params, self.offsets, batch,
                                                   cfg=self.engine.model.cfg, rosa=rosa,
                                                   top_k=rosa.head_top_k or HIDDEN_OFFSET_TOP_K)
        return stats


ADAPTERS: dict[str, type[Weights]] = {"lora": LoraWeights, "hidden": HiddenOffsetWeights}


# ---------------------------------------------------------------------- methods
@dataclasses.dataclass(frozen=True)
class Adaptation:
    """The streams a method runs after every failed turn."""

    streams: tuple[type[Stream], ...] = ()

    def streams_at(self, turn: int, cfg: EngineConfig) -> tuple[type[Stream], ...]:
        return self.streams

    def all_streams(self, cfg: EngineConfig) -> tuple[type[Stream], ...]:
        seen = dict.fromkeys(s for t in range(1, cfg.max_turns + 1) for s in self.streams_at(t, cfg))
        return tuple(seen)


@dataclasses.dataclass(frozen=True)
class Switch(Adaptation):
    """One axis before `EngineConfig.switch_turn`, the other from then on (`switch_first` goes first)."""

    def streams_at(self, turn, cfg):
        first = turn < cfg.switch_turn
        return (Words,) if first == (cfg.switch_first == "words") else (Weights,)


METHODS: dict[str, Adaptation] = {
    "baseline": Adaptation(),
    "words": Adaptation((Words,)),
    "textgrad": Adaptation((SystemPrompt,)),
    "rosa": Adaptation((Weights,)),
    "rosa2": Adaptation((Words, Weights)),
    "switch": Switch(),
}


# ---------------------------------------------------------------------- the engine
class SessionEngine:
    """Runs `cfg.method` over problems. On a mesh (the one `model` was loaded onto, load_model(mesh=)) the
    slots are split over its `data` axis: `cfg.slots` must be a multiple of it."""

    def __init__(self, model: LoadedModel, cfg: EngineConfig, text_model: TextModel | None = None):
        self.model, self.cfg, self.text_model = model, cfg, text_model
        self.sampler = model.sampler
        self.mesh = model.mesh
        if self.mesh is not None and cfg.slots % self.mesh.shape["data"]:
            raise ValueError(f"slots={cfg.slots} must be a multiple of the mesh's data axis "
                             f"({self.mesh.shape['data']})")
        kinds = METHODS[cfg.method].all_streams(cfg)
        if any(k.needs_text_model for k in kinds) and text_model is None:
            raise ValueError(f"method {cfg.method!r} needs a text model")
        if cfg.reward == "model" and text_model is None:
            raise ValueError("the model-based reward needs a text model to judge the answers")
        self.window = -(-cfg.sampling.max_new_tokens // cfg.rosa.position_chunk) * cfg.rosa.position_chunk
        self.max_prompt = (cfg.max_context or model.cfg.max_position_embeddings) - cfg.sampling.max_new_tokens
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="words")
        self.streams = {kind: kind.create(self) for kind in kinds}

    def _prompt_ids(self, s: Session) -> list[int]:
        """Chat-template ids; over the budget, drop the oldest (assistant, user) exchanges, never x_1."""
        messages = list(s.messages)
        while True:
            ids = self.sampler.render([{"role": "system", "content": s.system_prompt}] + messages)
            if len(ids) <= self.max_prompt or len(messages) < 3:
                return ids
            messages = messages[:1] + messages[3:]

    # ------------------------------------------------------------------ the four phases of a step
    def answer(self, slots: dict[int, Session], prompts: dict[int, list[int]]) -> dict[int, Generation]:
        rows = [prompts.get(i, [self.sampler.pad_id]) for i in range(self.cfg.slots)]
        seeds = [session_seed(self.cfg.seed, s.problem.id, s.turn) if (s := slots.get(i)) else 0
                 for i in range(self.cfg.slots)]
        inputs = {k: v for stream in self.streams.values() for k, v in stream.generation_inputs().items()}
        gens = self.sampler.generate(rows, self.cfg.sampling, seeds=seeds, **inputs)
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
        joins = []
        for kind, stream in sorted(self.streams.items(), key=lambda ks: ks[1].on_device):
            mine = {i: f for i, f in failed.items() if kind in self.cfg.streams(f.session.turn)}
            if mine:
                joins.append((stream, stream.start(mine)))
        outcomes, timing = [], {"update_s": 0.0, "words_s": 0.0}
        for stream, join in joins:
            results, seconds = join()
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
    def _admit(self, slot: int, problem: Problem) -> Session:
        """A new session in `slot`; its `error` is set instead when its first turn cannot fit."""
        s = Session(problem, self.cfg.system_prompt)
        s.messages.append({"role": "user", "content": problem.question})
        needed = len(self._prompt_ids(s))
        if needed > self.max_prompt:  # later turns trim down to x_1, so only x_1 can overflow
            s.error = (f"context overflow: the first turn needs {needed} tokens, the budget is {self.max_prompt} "
                       "(context minus max_new_tokens); raise --max_context or lower --max_new_tokens")
            return s
        for stream in self.streams.values():
            stream.reset(slot, s)
        return s

    def run(self, problems: Iterable[Problem], on_finish: Callable[[Session], None]) -> None:
        queue = deque(problems)
        slots: dict[int, Session] = {}
        while queue or slots:
            for i in range(self.cfg.slots):
                while i not in slots and queue:
                    s = self._admit(i, queue.popleft())
                    if s.error:
                        on_finish(s)
                    else:
                        slots[i] = s
            if slots:
                for i in self.step(slots):
                    on_finish(slots.pop(i))

    def close(self):
        self.pool.shutdown(wait=True)
