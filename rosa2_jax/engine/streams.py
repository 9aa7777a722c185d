"""The kinds of adaptation after a failed turn (`Stream`s) and the Weights stream's adapters.

A stream starts on the failed sessions of a step and, when joined, gives each session's result, which it then
writes into the session, its turn record and the next user message. Streams see the engine through a
`StreamContext`: the run's config, the policy, the pool of sessions they keep state for, and where host jobs run.
A new kind of adaptation is one `Stream` subclass and one row of `methods.METHODS`.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from rosa2_jax.adapt.rosa import UpdateBatch, UpdateStats, hidden_offset_update, rosa_update
from rosa2_jax.adapt.text_models import TextModel
from rosa2_jax.adapt.words import RefineRequest, RefineResult, refine_feedback, refine_system_prompt
from rosa2_jax.checkpoint import LoadedModel
from rosa2_jax.engine.session import Failure, Session, session_seed
from rosa2_jax.model.generation import bucket_length, left_pad
from rosa2_jax.model.lora import LoraAdapters, init_adapters, put_sessions, take_sessions
from rosa2_jax.model.sharding import shard_batch
from rosa2_jax.tasks.problem import Problem
from rosa2_jax.tasks.records import TurnRecord

if TYPE_CHECKING:  # the config and the methods table name the streams
    from rosa2_jax.engine.config import EngineConfig
    from rosa2_jax.engine.methods import Adaptation

HIDDEN_OFFSET_TOP_K = 64  # support of the d x d head metric the offset step forms when rosa.head_top_k is 0 (exact)
UPDATE_STATS = ("step_norm_sq", "residual_norm", "cg_rel_residual", "kl_before", "kl_after", "logp_before",
                "logp_after", "damping")


@dataclasses.dataclass(frozen=True)
class StreamContext:
    """What a stream may use of its engine."""

    cfg: EngineConfig
    model: LoadedModel  # the policy
    pool_size: int  # sessions whose state the streams keep, named by their pool slot
    data_shards: int  # devices the sessions are split over (the mesh's data extent)
    window: int  # response positions a Weights step covers at most
    text_model: TextModel | None  # what the Words streams call (sampled as the policy is)
    submit: Callable[..., Future]  # runs a host job on the engine's worker threads
    methods: Mapping[str, Adaptation]  # the methods table, for a method's own settings

    @property
    def mesh(self) -> Mesh | None:
        return self.model.mesh


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


class Stream:
    """One kind of adaptation after a failed turn. `start` begins it for the failed sessions and returns a
    future of (each session's result, seconds); `apply` writes a result into the session, its turn record,
    and the next user message. Sessions are named by their slot in the engine's pool of sessions."""

    needs_text_model = False
    on_device = False  # device streams run on the engine's thread, after the host ones are submitted
    changes_weights = False  # the policy's weights change: a session's cached keys/values can be stale after it
    timing_key = "words_s"

    def __init__(self, ctx: StreamContext):
        self.ctx = ctx

    @classmethod
    def create(cls, ctx: StreamContext) -> "Stream":
        return cls(ctx)

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
        return self.ctx.cfg.feedback

    def start(self, failed):
        cfg = self.ctx.cfg
        requests = []
        for f in failed.values():
            kind = self.ctx.methods[f.session.method].critic_reference or cfg.critic_reference
            requests.append(RefineRequest(
                problem=f.session.problem.question, attempt=f.response, extracted_answer=f.verdict.extracted,
                current=self.current(f.session), previous_feedback=f.session.previous_feedback,
                ground_truth=f.session.problem.answer, reference=critic_reference(f.session.problem, kind),
                reference_kind=kind, seed=session_seed(cfg.seed, f.session.problem.id, f.session.turn)))

        def run():
            start = time.perf_counter()
            out = self.refine(self.ctx.text_model, requests, critic_tokens=cfg.critic_tokens,
                              rewrite_tokens=cfg.rewrite_tokens, retries=cfg.words_retries)
            return dict(zip(failed, out)), time.perf_counter() - start

        return self.ctx.submit(run)

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
    def create(cls, ctx):
        return ADAPTERS[ctx.cfg.adapter](ctx)

    def __init__(self, ctx):
        super().__init__(ctx)
        # Set by the token engine, which keeps a session's cache below `first_changed_layer` across the step:
        # pool slot -> the residual stream entering that layer at the failed turn's tokens [R >= tokens, d], or
        # None where the step left the adapter as it was.
        self.keep_layer_inputs = False
        self.layer_inputs: dict[int, Array | None] = {}

    @property
    def first_changed_layer(self) -> int:
        """The first layer whose keys/values a step can change (num_layers: none)."""
        raise NotImplementedError

    def step(self, batch: UpdateBatch, slots: Int[Array, "U"]) -> tuple[UpdateStats, Array | None]:
        """Update the adapters of pool slots `slots` (the batch's rows, in order) where the batch is active;
        return per-row stats and, with `keep_layer_inputs`, the residual stream entering `first_changed_layer` at
        every token of the batch [U, T, d] (None when the step has none to give)."""
        raise NotImplementedError

    def state(self, slot: int) -> dict[str, np.ndarray]:
        """Pool slot `slot`'s adapter on the host (what `load_state` puts back)."""
        raise NotImplementedError

    def load_state(self, slot: int, state: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def start(self, failed):
        """The failed sessions' step: one vmapped step on a bucket of them, or, in passes of one session on one
        data shard (`--update_batch=1`, the CPU default), one step per session at its own length. A pass costs
        what its padded shape costs, so a bucket would make each session pay for its longest neighbour's row
        and for the inactive rows that round it up to a power of two."""
        ctx = self.ctx
        start = time.perf_counter()
        if len(failed) > ctx.cfg.rows:
            raise ValueError(f"{len(failed)} failed sessions exceed the update bucket of {ctx.cfg.rows}")
        alone = ctx.cfg.rosa.session_batch == 1 and ctx.data_shards == 1
        results, self.layer_inputs = {}, {}
        for group in ([{i: failed[i]} for i in sorted(failed)] if alone else [failed]):
            results |= self._bucket_step(group)
        return completed((results, time.perf_counter() - start))

    def _bucket_step(self, failed) -> dict[int, dict]:
        """One vmapped step on a bucket of `update_bucket` rows: the failed sessions, padded with inactive rows
        of other pool slots (each slot at most once, so writing the bucket back is unambiguous)."""
        ctx = self.ctx
        bucket = update_bucket(len(failed), ctx.cfg.rows, ctx.data_shards)
        others = [i for i in range(ctx.pool_size) if i not in failed]
        slots = sorted([*failed, *others[: bucket - len(failed)]])
        pad_id = ctx.model.sampler.pad_id
        rows, lens = [], []
        for i in slots:
            f = failed.get(i)
            rows.append(f.prompt + f.tokens if f else [pad_id])
            lens.append(len(f.tokens) if f else 0)
        # Rows of J are only the responses: the window covers the longest one (bucketed, so that a sweep
        # compiles a few programs), not max_new_tokens, when every answer stopped early.
        chunk = ctx.cfg.rosa.position_chunk
        window = min(ctx.window, -(-bucket_length(max(lens)) // chunk) * chunk)
        length = bucket_length(max(max(len(r) for r in rows), window + 1))  # row 0 of the window needs a predecessor
        tokens, valid = left_pad(rows, length, pad_id)
        batch = shard_batch(UpdateBatch(jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(np.minimum(lens, window)),
                                        jnp.full((bucket,), -1.0, jnp.float32),
                                        jnp.asarray([i in failed for i in slots]), window=window),
                            ctx.mesh)
        stats, inputs = self.step(batch, shard_batch(jnp.asarray(slots, jnp.int32), ctx.mesh))
        stats = jax.device_get(stats)
        if self.keep_layer_inputs:
            self.layer_inputs |= {i: _row_inputs(inputs, r, length - len(rows[r])) if stats.updated[r] else None
                                  for r, i in enumerate(slots) if i in failed}
        return {i: {k: float(np.asarray(getattr(stats, k))[r]) for k in UPDATE_STATS} | {
            "cg_iters": int(stats.cg_iters[r]), "backtracks": int(stats.backtracks[r]),
            "rejected": bool(stats.rejected[r]), "nonfinite": bool(stats.nonfinite[r])}
            for r, i in enumerate(slots) if i in failed}

    def apply(self, session, record, result, message):
        record.update = result
        record.step_norm_sq = result["step_norm_sq"]
        return message


def update_bucket(failed: int, rows: int, data_shards: int = 1) -> int:
    """Sessions in one Weights step on `failed` sessions: a power of two times the mesh's `data` extent, at most
    `rows`. Inactive sessions cost as much as active ones inside the vmap, so a bucket of 3 failures with 16 rows
    runs 4, not 16; powers of two keep the compiled programs few."""
    bucket = data_shards
    while bucket < failed:
        bucket *= 2
    return min(bucket, rows)


@jax.jit
def _row_inputs(inputs: Float[Array, "U T d"], row: Int[Array, ""], pad: Int[Array, ""]) -> Float[Array, "T d"]:
    """Row `row` of a left-padded batch's inputs with its `pad` padding tokens moved to the end: row t is token t."""
    return jnp.roll(inputs[row], -pad, axis=0)


@jax.jit
def _take(pool, slots):
    """The bucket's rows of a pool of per-session arrays (LoRA factors or hidden offsets)."""
    return take_sessions(pool, slots) if isinstance(pool, LoraAdapters) else pool[slots]


@jax.jit
def _put(pool, slots, bucket):
    return put_sessions(pool, slots, bucket) if isinstance(pool, LoraAdapters) else pool.at[slots].set(bucket)


class LoraWeights(Weights):
    """θ = the session's LoRA factors (spec 1.3)."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.adapters = shard_batch(init_adapters(ctx.model.cfg, ctx.cfg.lora, ctx.pool_size,
                                                  jax.random.key(ctx.cfg.seed)), ctx.mesh)

    def reset(self, slot, session):
        key = jax.random.key(session_seed(self.ctx.cfg.seed, session.problem.id, 0))
        fresh = init_adapters(self.ctx.model.cfg, self.ctx.cfg.lora, 1, key)
        self.adapters = shard_batch(self.adapters.replace(
            factors=jax.tree.map(lambda a, f: a.at[slot].set(f[0]), self.adapters.factors, fresh.factors)),
            self.ctx.mesh)

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
        self.adapters = shard_batch(self.adapters.replace(factors=factors), self.ctx.mesh)

    @property
    def first_changed_layer(self):
        return self.adapters.first_layer

    def step(self, batch, slots):
        update = rosa_update(self.ctx.model.params, _take(self.adapters, slots), batch, cfg=self.ctx.model.cfg,
                             rosa=self.ctx.cfg.rosa, layer_inputs=self.keep_layer_inputs)
        self.adapters = shard_batch(_put(self.adapters, slots, update[0]), self.ctx.mesh)
        return update[1], update[2] if self.keep_layer_inputs else None


class HiddenOffsetWeights(Weights):
    """θ = an offset of the final hidden state on response positions (ROSA's "HS" variant)."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.offsets = shard_batch(jnp.zeros((ctx.pool_size, ctx.model.cfg.hidden_size), jnp.float32), ctx.mesh)

    def reset(self, slot, session):
        self.offsets = shard_batch(self.offsets.at[slot].set(0.0), self.ctx.mesh)

    def generation_inputs(self):
        return {"hidden_offset": self.offsets}

    def state(self, slot):
        return {"offset": np.asarray(self.offsets[slot])}

    def load_state(self, slot, state):
        if state["offset"].shape != self.offsets.shape[1:]:
            raise ValueError(f"offset state has shape {state['offset'].shape}, the pool's is {self.offsets.shape[1:]}")
        self.offsets = shard_batch(self.offsets.at[slot].set(state["offset"]), self.ctx.mesh)

    def step(self, batch, slots):
        rosa = self.ctx.cfg.rosa
        bucket, stats = hidden_offset_update(self.ctx.model.params, _take(self.offsets, slots), batch,
                                             cfg=self.ctx.model.cfg, rosa=rosa,
                                             top_k=rosa.head_top_k or HIDDEN_OFFSET_TOP_K)
        self.offsets = shard_batch(_put(self.offsets, slots, bucket), self.ctx.mesh)
        return stats, None

    @property
    def first_changed_layer(self):
        return self.ctx.model.cfg.num_layers  # the offset is added after the last layer


ADAPTERS: dict[str, type[Weights]] = {"lora": LoraWeights, "hidden": HiddenOffsetWeights}
