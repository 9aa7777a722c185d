"""`METHODS`, the table of methods: which streams a method runs after a failed turn, and the Weights presets."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from rosa2_jax.adapt.rosa import RosaConfig
from rosa2_jax.engine.streams import Stream, SystemPrompt, Weights, Words
from rosa2_jax.model.lora import LoraConfig, parse_layers

if TYPE_CHECKING:  # the config checks its method against this table
    from rosa2_jax.engine.config import EngineConfig


@dataclasses.dataclass(frozen=True)
class WeightsPreset:
    """How the Weights stream is run: what it adapts and how exactly it solves (BUILD_NOTES.md, "The Weights step")."""

    adapter: str  # one of streams.ADAPTERS
    lora_layers: str  # all | last:N | I-J (lora.parse_layers)
    lora_targets: tuple[str, ...]  # LoraConfig.targets
    head_top_k: int  # RosaConfig.head_top_k (0 = exact head metric)
    cg_iters: int
    backtrack: int  # RosaConfig.backtrack (0 = the plain step)
    max_step_norm: float  # RosaConfig.max_step_norm, the trust region on ||Δθ||
    trunk_dtype: str | None = None  # RosaConfig.trunk_dtype, the trunk's matmul weights (None: as stored)

    def rosa(self, **fields) -> RosaConfig:
        """This preset's RosaConfig; `fields` set the others (beta, tilt, remat, ...)."""
        return RosaConfig(cg_iters=self.cg_iters, head_top_k=self.head_top_k, backtrack=self.backtrack,
                          max_step_norm=self.max_step_norm, trunk_dtype=self.trunk_dtype, **fields)

    def lora(self, num_layers: int, **fields) -> LoraConfig:
        """This preset's LoraConfig for a `num_layers`-layer model; `fields` set rank and alpha."""
        return LoraConfig(targets=tuple(self.lora_targets), layers=parse_layers(self.lora_layers, num_layers), **fields)


PRESETS = {
    "paper": WeightsPreset("lora", "all", ("q", "v"), 0, 10, 0, 1.0),  # spec 1.3-1.4: exact head, 10 CG iterations
    # BUILD_NOTES.md, "The Weights step": 97% of the paper step's KL reduction at 14% of its cost
    "fast": WeightsPreset("lora", "last:8", ("q", "k", "v", "o", "gate", "up", "down"), 64, 4, 3, 10.0),
}


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
    # The Words stream with a critic that sees the worked solution (BUILD_NOTES.md, "Words that instruct")
    "words-ref": Adaptation((Words,), critic_reference="solution"),
    "rosa2-ref": Adaptation((Words, Weights), critic_reference="solution"),
}
