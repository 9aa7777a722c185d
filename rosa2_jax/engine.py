"""The co-adaptation engine (ROSA2 Algorithm 1) over many problems with a fixed number of session slots.

Each slot holds one problem's history, adapter and turn counter. Every step generates one turn for all
occupied slots in a single batch, verifies, then for the failing sessions runs the Words step (text
model, on a worker thread) and the Weights step (ROSA update, on the device) at the same time, and joins.
A slot is refilled as soon as its session ends (solved, or K turns), so the batch stays full.

Every random choice of a session (adapter init, sampling) is seeded from (seed, problem id, turn), so a
problem's trajectory does not depend on which slot it lands in or what else shares its batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rosa2_jax.checkpoint import LoadedModel
from rosa2_jax.tasks.data import Problem
from rosa2_jax.model.generation import SamplingConfig, bucket_length, generate, left_pad
from rosa2_jax.model.lora import LoraConfig, init_adapters
from rosa2_jax.tasks.rewards import verify
from rosa2_jax.adapt.rosa import RosaConfig, UpdateBatch, hidden_offset_update, rosa_update
from rosa2_jax.model.sharding import shard_batch
from rosa2_jax.adapt.text_models import TextModel
from rosa2_jax.model.tokenizer import render_chat, stop_token_ids
from rosa2_jax.adapt.words import FEEDBACK_TEMPLATE, RefineRequest, refine_feedback, refine_system_prompt

METHODS = ("baseline", "words", "textgrad", "rosa", "rosa2", "switch")
ADAPTERS = ("lora", "hidden")  # what the Weights stream adapts: LoRA factors, or an offset of the final hidden state
HIDDEN_OFFSET_TOP_K = 64  # support of the d x d head metric the offset step forms when rosa.head_top_k is 0 (exact)
UPDATE_STATS = ("step_norm_sq", "residual_norm", "cg_rel_residual", "kl_before", "kl_after", "logp_before",
                "logp_after", "damping")
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
    adapter: str = "lora"
    system_prompt: str = MATH_SYSTEM_PROMPT
    feedback: str = FEEDBACK_TEMPLATE  # the raw x_{t+1}, the same for every method
    switch_turn: int = 5  # `switch`: first axis before this turn, the other from it on
    switch_first: str = "words"
    seed: int = 0
    equivalence: str = "math-verify"
    boxed_only: bool = True  # count only a \boxed{} answer, as the paper's rule-based reward does
    critic_tokens: int = 512
    rewrite_tokens: int = 256
    max_context: int | None = None  # default: the model's window

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {METHODS}")
        if self.switch_first not in ("words", "weights"):
            raise ValueError("switch_first must be words or weights")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {self.adapter!r}; choose from {ADAPTERS}")

    def axes(self, turn: int) -> tuple[bool, bool, bool]:
        """(words, weights, system prompt) adaptation after a failure at `turn`."""
        m = self.method
        if m == "switch":
            first = turn < self.switch_turn
            words = first == (self.switch_first == "words")
            return words, not words, False
        return m in ("words", "rosa2"), m in ("rosa", "rosa2"), m == "textgrad"


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
    turns: list[dict] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


class SessionEngine:
    """Runs `cfg.method` over problems. With `mesh`, the slots are split over its `data` axis (`cfg.slots`
    must be a multiple of it) and `model.params` should have been loaded onto it (load_model(mesh=))."""

    def __init__(self, model: LoadedModel, cfg: EngineConfig, text_model: TextModel | None = None,
                 mesh: Mesh | None = None):
        if mesh is not None and cfg.slots % mesh.shape["data"]:
            raise ValueError(f"slots={cfg.slots} must be a multiple of the mesh's data axis ({mesh.shape['data']})")
        words, _, system = zip(*(cfg.axes(t) for t in range(1, cfg.max_turns + 1)))
        if (any(words) or any(system)) and text_model is None:
            raise ValueError(f"method {cfg.method!r} needs a text model")
        self.model, self.cfg, self.text_model, self.mesh = model, cfg, text_model, mesh
        self.tok = model.tokenizer
        self.stop_ids = stop_token_ids(self.tok)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.stop_ids[0]
        self.uses_weights = any(cfg.axes(t)[1] for t in range(1, cfg.max_turns + 1))
        self.window = -(-cfg.sampling.max_new_tokens // cfg.rosa.position_chunk) * cfg.rosa.position_chunk
        self.max_prompt = (cfg.max_context or model.cfg.max_position_embeddings) - cfg.sampling.max_new_tokens
        self.adapters = self.offsets = None
        if self.uses_weights and cfg.adapter == "lora":
            self.adapters = shard_batch(init_adapters(model.cfg, cfg.lora, cfg.slots, jax.random.key(cfg.seed)), mesh)
        elif self.uses_weights:
            self.offsets = shard_batch(jnp.zeros((cfg.slots, model.cfg.hidden_size), jnp.float32), mesh)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="words")

    # ------------------------------------------------------------------ prompts
    def _conversation(self, s: Session) -> list[dict]:
        return [{"role": "system", "content": s.system_prompt}] + s.messages

    def _prompt_ids(self, s: Session) -> list[int]:
        """Chat-template ids; over the budget, drop the oldest (assistant, user) exchanges, never x_1."""
        messages = list(s.messages)
        while True:
            ids = render_chat(self.tok, [{"role": "system", "content": s.system_prompt}] + messages)
            if len(ids) <= self.max_prompt or len(messages) < 3:
                return ids
            messages = messages[:1] + messages[3:]

    def _reset_slot(self, slot: int, problem: Problem):
        if self.offsets is not None:
            self.offsets = shard_batch(self.offsets.at[slot].set(0.0), self.mesh)
        if self.adapters is None:
            return
        key = jax.random.key(session_seed(self.cfg.seed, problem.id, 0))
        fresh = init_adapters(self.model.cfg, self.cfg.lora, 1, key)
        self.adapters = shard_batch(self.adapters.replace(
            factors=jax.tree.map(lambda a, f: a.at[slot].set(f[0]), self.adapters.factors, fresh.factors)), self.mesh)

    # ------------------------------------------------------------------ one step of all slots
    def _generate(self, slots: dict[int, Session], prompts: dict[int, list[int]]):
        rows = [prompts.get(i, [self.pad_id]) for i in range(self.cfg.slots)]
        seeds = [session_seed(self.cfg.seed, s.problem.id, s.turn) if (s := slots.get(i)) else 0
                 for i in range(self.cfg.slots)]
        return generate(self.model.params, self.model.cfg, rows, self.cfg.sampling, stop_token_ids=self.stop_ids,
                        pad_id=self.pad_id, seeds=seeds, adapters=self.adapters, hidden_offset=self.offsets,
                        mesh=self.mesh)

    def _update(self, failing: dict[int, tuple[list[int], list[int]]]):
        """ROSA step for the failing slots (others inactive and untouched). Returns per-slot stats."""
        rows, lens = [], []
        for i in range(self.cfg.slots):
            prompt, response = failing.get(i, ([self.pad_id], []))
            rows.append(prompt + response)
            lens.append(len(response))
        # Rows of J are only the responses: the window covers the longest one (bucketed, so that a sweep
        # compiles a few programs), not max_new_tokens, when every answer stopped early.
        chunk = self.cfg.rosa.position_chunk
        window = min(self.window, -(-bucket_length(max(lens)) // chunk) * chunk)
        length = bucket_length(max(max(len(r) for r in rows), window + 1))  # row 0 of the window needs a predecessor
        tokens, valid = left_pad(rows, length, self.pad_id)
        batch = shard_batch(UpdateBatch(jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(np.minimum(lens, window)),
                            jnp.full((self.cfg.slots,), -1.0, jnp.float32),
                            jnp.asarray([i in failing for i in range(self.cfg.slots)]), window=window),
                            self.mesh)
        if self.offsets is not None:
            self.offsets, stats = hidden_offset_update(self.model.params, self.offsets, batch, cfg=self.model.cfg,
                                                       rosa=self.cfg.rosa,
                                                       top_k=self.cfg.rosa.head_top_k or HIDDEN_OFFSET_TOP_K)
        else:
            self.adapters, stats = rosa_update(self.model.params, self.adapters, batch, cfg=self.model.cfg,
                                               rosa=self.cfg.rosa)
        return stats

    def _refine(self, requests: list[tuple[int, RefineRequest]], system: bool):
        fn = refine_system_prompt if system else refine_feedback
        start = time.perf_counter()
        out = fn(self.text_model, [r for _, r in requests], critic_tokens=self.cfg.critic_tokens,
                 rewrite_tokens=self.cfg.rewrite_tokens)
        return {i: r for (i, _), r in zip(requests, out)}, time.perf_counter() - start

    def step(self, slots: dict[int, Session]) -> list[int]:
        """One turn for every occupied slot; returns the slots whose session ended."""
        cfg = self.cfg
        step_start = time.perf_counter()
        prompts = {i: self._prompt_ids(s) for i, s in slots.items()}
        for s in slots.values():
            s.turn += 1
        t0 = time.perf_counter()
        gens = self._generate(slots, prompts)
        generate_s = time.perf_counter() - t0
        ended, failing, words_req, system_req = [], {}, [], []
        responses = {}
        for i, s in slots.items():
            text = self.tok.decode(gens[i].tokens, skip_special_tokens=True)
            responses[i] = text
            verdict = verify(s.problem, text, equivalence=cfg.equivalence, boxed_only=cfg.boxed_only)
            s.turns.append({"turn": s.turn, "user": s.messages[-1]["content"], "system_prompt": s.system_prompt,
                            "response": text, "extracted": verdict.extracted, "reward": verdict.reward,
                            "response_tokens": len(gens[i].tokens), "finish_reason": gens[i].finish_reason,
                            "prompt_tokens": len(prompts[i])})
            if verdict.reward > 0:
                s.solved_at = s.turn
                ended.append(i)
                continue
            if s.turn >= cfg.max_turns:
                ended.append(i)
                continue
            words, weights, system = cfg.axes(s.turn)
            if weights:
                failing[i] = (prompts[i], gens[i].tokens)
            if words or system:
                request = RefineRequest(problem=s.problem.question, attempt=text, extracted_answer=verdict.extracted,
                                        current=s.system_prompt if system else cfg.feedback,
                                        previous_feedback=s.previous_feedback, ground_truth=s.problem.answer)
                (system_req if system else words_req).append((i, request))
        # Words on a worker thread while the device runs the weights update (Alg. 1 steps A and B).
        futures = [self._pool.submit(self._refine, reqs, system) for reqs, system in
                   ((words_req, False), (system_req, True)) if reqs]
        update_s, stats = 0.0, None
        if failing:
            t0 = time.perf_counter()
            stats = jax.device_get(self._update(failing))
            update_s = time.perf_counter() - t0
        refined, words_s = {}, 0.0
        for f in futures:
            out, seconds = f.result()
            refined.update(out)
            words_s += seconds
        for i, s in slots.items():
            record = s.turns[-1]
            record["timing"] = {"generate_s": generate_s, "update_s": update_s, "words_s": words_s}
            if i in ended:
                continue
            _, weights, system = cfg.axes(s.turn)
            if weights:
                record["update"] = {k: float(np.asarray(getattr(stats, k))[i]) for k in UPDATE_STATS} | {
                    "cg_iters": int(stats.cg_iters[i]), "backtracks": int(stats.backtracks[i]),
                    "rejected": bool(stats.rejected[i]), "nonfinite": bool(stats.nonfinite[i])}
                record["step_norm_sq"] = record["update"]["step_norm_sq"]
            message = cfg.feedback
            if i in refined:
                r = refined[i]
                record["refine"] = {"status": r.status, "critique": r.critique, "message": r.message}
                record["semantic_shift"] = r.semantic_shift
                if system:
                    s.system_prompt = r.message or s.system_prompt
                else:
                    message = r.message
                    s.previous_feedback = r.message
            s.messages += [{"role": "assistant", "content": responses[i]}, {"role": "user", "content": message}]
        share = (time.perf_counter() - step_start) / max(len(slots), 1)
        for s in slots.values():
            s.seconds += share
        return ended

    # ------------------------------------------------------------------ the whole run
    def run(self, problems: Iterable[Problem], on_finish: Callable[[Session], None]) -> None:
        queue = deque(problems)
        slots: dict[int, Session] = {}
        while queue or slots:
            for i in range(self.cfg.slots):
                while i not in slots and queue:
                    s = Session(queue.popleft(), self.cfg.system_prompt)
                    s.messages.append({"role": "user", "content": s.problem.question})
                    needed = len(self._prompt_ids(s))
                    if needed > self.max_prompt:  # later turns trim down to x_1, so only x_1 can overflow
                        s.error = (f"context overflow: the first turn needs {needed} tokens, the budget is "
                                   f"{self.max_prompt} (context minus max_new_tokens); raise --max_context or "
                                   "lower --max_new_tokens")
                        on_finish(s)
                        continue
                    self._reset_slot(i, s.problem)
                    slots[i] = s
            if slots:
                for i in self.step(slots):
                    on_finish(slots.pop(i))

    def close(self):
        self._pool.shutdown(wait=True)
