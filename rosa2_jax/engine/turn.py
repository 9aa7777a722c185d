"""The turn engine: every slot generates one turn in one batched call, then every failed session adapts.

It waits for the longest answer and prefills every history again each turn; the token engine (engine/token.py)
does neither and writes the same greedy records. This one is the reference the token engine is tested against.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

from rosa2_jax.engine.host_memory import HostMemory
from rosa2_jax.engine.lifecycle import Engine, Lifecycle, words_model
from rosa2_jax.engine.session import Session, Work, session_seed
from rosa2_jax.engine.stats import SchedulerStats
from rosa2_jax.model.generation import Generation


class TurnEngine(Engine):
    """Runs `cfg.rows` sessions at a time (one per row of the decode batch), one turn per step."""

    def __init__(self, model, cfg, text_model=None, adapter_cache=None):
        self.life = Lifecycle(model, cfg, text_model, pool_size=cfg.rows, host_workers=1,
                              words=words_model(text_model, cfg), adapter_cache=adapter_cache)
        self.stats = SchedulerStats()

    def answer(self, slots: dict[int, Session], prompts: dict[int, list[int]]) -> dict[int, Generation]:
        """One batched generation over every slot (empty ones decode a pad token)."""
        life = self.life
        rows = [prompts.get(i, [life.sampler.pad_id]) for i in range(self.cfg.rows)]
        seeds = [session_seed(self.cfg.seed, s.problem.id, s.turn) if (s := slots.get(i)) else 0
                 for i in range(self.cfg.rows)]
        gens = life.sampler.generate(rows, self.cfg.sampling, seeds=seeds, **life.generation_inputs())
        counts = [len(gens[i].tokens) for i in slots]
        self.stats.generated += sum(counts)
        self.stats.row_steps += max(counts) * self.cfg.rows  # every row runs as long as the longest answer
        return {i: gens[i] for i in slots}

    def step(self, slots: dict[int, Session]) -> list[int]:
        """One turn for every occupied slot; returns the slots whose session ended."""
        life = self.life
        step_start = time.perf_counter()
        prompts = {i: life.prompt_ids(s) for i, s in slots.items()}
        for s in slots.values():
            s.turn += 1
        t0 = time.perf_counter()
        gens = self.answer(slots, prompts)
        generate_s = time.perf_counter() - t0
        self.stats.decode_s += generate_s
        ended, failed = life.judge(slots, prompts, gens)
        outcomes, timing = life.adapt(failed)
        self.stats.update_s += timing["update_s"]
        self.stats.updates += sum(stream.on_device for stream, _ in outcomes)
        life.advance(slots, ended, outcomes, {"generate_s": generate_s} | timing)
        share = (time.perf_counter() - step_start) / max(len(slots), 1)
        for s in slots.values():
            s.seconds += share
        return ended

    def run(self, problems: Iterable[Work], on_finish: Callable[[Session], None],
            on_ready: Callable[[Session], None] = lambda s: None) -> None:
        life = self.life
        queue = life.start(problems)
        slots: dict[int, Session] = {}
        host_memory = HostMemory(self.cfg.max_programs)
        while life.admissible() or slots:
            self.stats.programs_released += host_memory.tend()
            for i in range(self.cfg.rows):
                while i not in slots and life.admissible():
                    s = life.admit(i, queue.popleft())
                    if s.error:
                        on_finish(s)
                    else:
                        slots[i] = s
            life.restore.replay()
            if slots:
                ended = self.step(slots)
                for i in ended:
                    life.finished(slots.pop(i), on_finish)
                for i, s in slots.items():
                    life.ready(i, s, on_ready)
