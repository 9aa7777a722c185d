"""The co-adaptation engine (ROSA2 Algorithm 1) over many problems and methods at once.

    config.py       EngineConfig: what decides a trajectory, and how it is scheduled
    session.py      Session (one problem under one method), its snapshot, Failure, session_seed
    streams.py      the kinds of adaptation (Words, SystemPrompt, Weights and its adapters) and their StreamContext
    methods.py      METHODS: which streams each method runs; the Weights presets
    lifecycle.py    admit -> prompt -> judge -> adapt -> advance, shared by both schedulers; Engine, their interface
    restore.py      sessions restored from snapshots: their Weights steps replayed, or their adapters loaded
    turn.py         TurnEngine: one turn for every slot per step (the reference)
    token.py        TokenEngine: continuous batching over a pool of sessions (the default)
    rows.py         the token engine's decode batch on the host side
    stats.py        SchedulerStats
    host_memory.py  a long run's host memory: compiled programs within a budget, the C heap trimmed
"""

from rosa2_jax.engine.config import MATH_SYSTEM_PROMPT, REWARDS, EngineConfig
from rosa2_jax.engine.lifecycle import Engine
from rosa2_jax.engine.methods import METHODS, PRESETS, Adaptation, WeightsPreset
from rosa2_jax.engine.session import Session, Work, method_of, session_seed
from rosa2_jax.engine.streams import ADAPTERS, Stream
from rosa2_jax.engine.token import TokenEngine
from rosa2_jax.engine.turn import TurnEngine

SCHEDULERS: dict[str, type[Engine]] = {"token": TokenEngine, "turn": TurnEngine}

__all__ = ["ADAPTERS", "MATH_SYSTEM_PROMPT", "METHODS", "PRESETS", "REWARDS", "SCHEDULERS", "Adaptation", "Engine",
           "EngineConfig", "Session", "Stream", "TokenEngine", "TurnEngine", "WeightsPreset", "Work", "method_of",
           "session_seed"]
