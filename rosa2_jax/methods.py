"""What a method does after a failed turn: the kinds of adaptation (`Stream`s), the Weights stream's adapters
and presets, and `METHODS`, the table of methods.

A stream starts on the failed sessions of a step and, when joined, gives each slot's result, which it then
writes into the session, its turn record and the next user message. A new kind of adaptation is one
`Stream` subclass and one `METHODS` row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from rosa2_jax.adapt.rosa import RosaConfig, UpdateBatch, UpdateStats, hidden_offset_update, rosa_update
from rosa2_jax.adapt.words import RefineRequest, RefineResult, refine_feedback, refine_system_prompt
from rosa2_jax.model.generation import bucket_length, left_pad
from rosa2_jax.model.lora import LoraAdapters, LoraConfig, init_adapters, parse_layers, put_sessions, take_sessions
from rosa2_jax.model.sharding import shard_batch
from rosa2_jax.tasks.data import Problem
from rosa2_jax.tasks.records import TurnRecord
from rosa2_jax.tasks.rewards import Verdict

if TYPE_CHECKING:
    from rosa2_jax.engine import EngineConfig, Session, SessionEngine

HIDDEN_OFFSET_TOP_K = 64  # support of the d x d head metric the offset step forms when rosa.head_top_k is 0 (exact)
UPDATE_STATS = ("step_norm_sq", "residual_norm", "cg_rel_residual", "kl_before", "kl_after", "logp_before",
                "logp_after", "damping")


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


def completed(value: Any) -> Future:
    """A future that already holds `value` (a stream that finished inside `start`)."""
    future = Future()
    future.set_result(value)
    return future


def critic_reference(problem: Problem, kind: str) -> str | None:
    """What a reference-aware critic sees of `problem` (words.REFERENCES): its answer, or its worked solution where
    the data set ships one (else its answer)."""
    if kind == "solution":
        return problem.meta.get("solution") or problem.answer
    return problem.answer if kind == "answer" else None


def session_seed(seed: int, problem_id: str, turn: int) -> int:
    digest = hashlib.sha256(f"{seed}/{problem_id}/{turn}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class Failure(NamedTuple):
    """A session's failed turn, as the streams see it."""

    session: Session
    prompt: list[int]  # the turn's prompt ids
    tokens: list[int]  # the judged response
    response: str
    verdict: Verdict


class Stream:
    """One kind of adaptation after a failed turn. `start` begins it for the failed sessions and returns a
    future of (each session's result, seconds); `apply` writes a result into the session, its turn record,
    and the next user message. Sessions are named by their slot in the engine's pool of sessions."""

    needs_text_model = False
    on_device = False  # device streams run on the engine's thread, after the host ones are submitted
    changes_weights = False  # the session's cached keys/values are stale after this stream
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

    def start(self, failed: dict[int, Failure]) -> Future:
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
        requests = []
        for f in failed.values():
            kind = METHODS[f.session.method].critic_reference or cfg.critic_reference
            requests.append(RefineRequest(
                problem=f.session.problem.question, attempt=f.response, extracted_answer=f.verdict.extracted,
                current=self.current(f.session), previous_feedback=f.session.previous_feedback,
                ground_truth=f.session.problem.answer, reference=critic_reference(f.session.problem, kind),
                reference_kind=kind, seed=session_seed(cfg.seed, f.session.problem.id, f.session.turn)))

        def run():
            start = time.perf_counter()
            out = self.refine(self.engine.words_model, requests, critic_tokens=cfg.critic_tokens,
                              rewrite_tokens=cfg.rewrite_tokens, retries=cfg.words_retries)
            return dict(zip(failed, out)), time.perf_counter() - start

        return self.engine.pool.submit(run)

    @staticmethod
    def write(record: TurnRecord, r: RefineResult) -> None:
        record.refine = {"status": r.status, "critique": r.critique, "message": r.message,
                         "instruction": r.instruction, "category": r.category, "candidates": list(r.candidates),
                         "tokens": r.tokens}
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
    changes_weights = True
    timing_key = "update_s"

    @classmethod
    def create(cls, engine):
        return ADAPTERS[engine.cfg.adapter](engine)

    def step(self, batch: UpdateBatch, slots: Int[Array, "U"]) -> UpdateStats:
        """Update the adapters of pool slots `slots` (the batch's rows, in order) where the batch is active;
        return per-row stats."""
        raise NotImplementedError

    def state(self, slot: int) -> dict[str, np.ndarray]:
        """Pool slot `slot`'s adapter on the host (what `load_state` puts back)."""
        raise NotImplementedError

    def load_state(self, slot: int, state: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def start(self, failed):
        """One vmapped step on a bucket of `update_bucket` rows: the failed sessions, padded with inactive rows
        of other pool slots (each slot at most once, so writing the bucket back is unambiguous)."""
        engine = self.engine
        start = time.perf_counter()
        if len(failed) > engine.cfg.slots:
            raise ValueError(f"{len(failed)} failed sessions exceed the update bucket of {engine.cfg.slots}")
        bucket = update_bucket(len(failed), engine.cfg.slots, engine.data)
        others = [i for i in range(engine.pool_size) if i not in failed]
        slots = sorted([*failed, *others[: bucket - len(failed)]])
        rows, lens = [], []
        for i in slots:
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
                                        jnp.full((bucket,), -1.0, jnp.float32),
                                        jnp.asarray([i in failed for i in slots]), window=window),
                            engine.mesh)
        stats = jax.device_get(self.step(batch, shard_batch(jnp.asarray(slots, jnp.int32), engine.mesh)))
        results = {i: {k: float(np.asarray(getattr(stats, k))[r]) for k in UPDATE_STATS} | {
            "cg_iters": int(stats.cg_iters[r]), "backtracks": int(stats.backtracks[r]),
            "rejected": bool(stats.rejected[r]), "nonfinite": bool(stats.nonfinite[r])}
            for r, i in enumerate(slots) if i in failed}
        return completed((results, time.perf_counter() - start))

    def apply(self, session, record, result, message):
        record.update = result
        record.step_norm_sq = result["step_norm_sq"]
        return message


def update_bucket(failed: int, slots: int, data: int = 1) -> int:
    """Rows of one Weights step on `failed` sessions: a power of two times the mesh's `data` extent, at most
    `slots`. Inactive rows cost as much as active ones inside the vmap, so a bucket of 3 failures on 16 slots
    runs 4 rows, not 16; powers of two keep the compiled programs few."""
    rows = data
    while rows < failed:
        rows *= 2
    return min(rows, slots)


@jax.jit
def _take(pool, slots):
    """The bucket's rows of a pool of per-session arrays (LoRA factors or hidden offsets)."""
    return take_sessions(pool, slots) if isinstance(pool, LoraAdapters) else pool[slots]


@jax.jit
def _put(pool, slots, bucket):
    return put_sessions(pool, slots, bucket) if isinstance(pool, LoraAdapters) else pool.at[slots].set(bucket)


class LoraWeights(Weights):
    """θ = the session's LoRA factors (spec 1.3)."""

    def __init__(self, engine):
        super().__init__(engine)
        cfg = engine.cfg
        self.adapters = shard_batch(init_adapters(engine.model.cfg, cfg.lora, engine.pool_size,
                                                  jax.random.key(cfg.seed)), engine.mesh)

    def reset(self, slot, session):
        key = jax.random.key(session_seed(self.engine.cfg.seed, session.problem.id, 0))
        fresh = init_adapters(self.engine.model.cfg, self.engine.cfg.lora, 1, key)
        self.adapters = shard_batch(self.adapters.replace(
            factors=jax.tree.map(lambda a, f: a.at[slot].set(f[0]), self.adapters.factors, fresh.factors)),
            self.engine.mesh)

    def generation_inputs(self):
        return {"adapters": self.adapters}

    def state(self, slot):
        """The adapted layers' factors (the layers below `first_layer` stay zero)."""
        first = self.adapters.first_layer
        return {f"{t}.{ab}": np.asarray(x[slot, first:]) for t, (a, b) in self.adapters.factors.items()
                for ab, x in (("a", a), ("b", b))}

    def load_state(self, slot, state):
        first = self.adapters.first_layer
        for t, (a, b) in self.adapters.factors.items():
            for ab, x in (("a", a), ("b", b)):
                want, got = (x.shape[1] - first, *x.shape[2:]), state[f"{t}.{ab}"].shape
                if got != want:
                    raise ValueError(f"adapter state {t}.{ab} has shape {got}, the pool's is {want}")
        factors = {t: (a.at[slot, first:].set(state[f"{t}.a"]), b.at[slot, first:].set(state[f"{t}.b"]))
                   for t, (a, b) in self.adapters.factors.items()}
        self.adapters = shard_batch(self.adapters.replace(factors=factors), self.engine.mesh)

    def step(self, batch, slots):
        bucket, stats = rosa_update(self.engine.model.params, _take(self.adapters, slots), batch,
                                    cfg=self.engine.model.cfg, rosa=self.engine.cfg.rosa)
        self.adapters = shard_batch(_put(self.adapters, slots, bucket), self.engine.mesh)
        return stats


class HiddenOffsetWeights(Weights):
    """θ = an offset of the final hidden state on response positions (ROSA's "HS" variant)."""

    def __init__(self, engine):
        super().__init__(engine)
        self.offsets = shard_batch(jnp.zeros((engine.pool_size, engine.model.cfg.hidden_size), jnp.float32),
                                   engine.mesh)

    def reset(self, slot, session):
        self.offsets = shard_batch(self.offsets.at[slot].set(0.0), self.engine.mesh)

    def generation_inputs(self):
        return {"hidden_offset": self.offsets}

    def state(self, slot):
        return {"offset": np.asarray(self.offsets[slot])}

    def load_state(self, slot, state):
        if state["offset"].shape != self.offsets.shape[1:]:
            raise ValueError(f"offset state has shape {state['offset'].shape}, the pool's is {self.offsets.shape[1:]}")
        self.offsets = shard_batch(self.offsets.at[slot].set(state["offset"]), self.engine.mesh)

    def step(self, batch, slots):
        rosa = self.engine.cfg.rosa
        bucket, stats = hidden_offset_update(self.engine.model.params, _take(self.offsets, slots), batch,
                                             cfg=self.engine.model.cfg, rosa=rosa,
                                             top_k=rosa.head_top_k or HIDDEN_OFFSET_TOP_K)
        self.offsets = shard_batch(_put(self.offsets, slots, bucket), self.engine.mesh)
        return stats


ADAPTERS: dict[str, type[Weights]] = {"lora": LoraWeights, "hidden": HiddenOffsetWeights}


@dataclasses.dataclass(frozen=True)
class Adaptation:
    """The streams a method runs after every failed turn. `fresh`: every later turn answers the first user message
    again, without the history (the resample control: K independent attempts). `critic_reference`: what this
    method's Words critic sees of the reference (words.REFERENCES), whatever the run's --critic_reference."""

    streams: tuple[type[Stream], ...] = ()
    fresh: bool = False
    critic_reference: str | None = None

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
    "resample": Adaptation(fresh=True),
    "words": Adaptation((Words,)),
    "textgrad": Adaptation((SystemPrompt,)),
    "rosa": Adaptation((Weights,)),
    "rosa2": Adaptation((Words, Weights)),
    "switch": Switch(),
    # The Words stream with a critic that sees the worked solution (BUILD_NOTES, "Words that instruct")
    "words-ref": Adaptation((Words,), critic_reference="solution"),
    "rosa2-ref": Adaptation((Words, Weights), critic_reference="solution"),
}
