"""EngineConfig: everything that decides a session's trajectory, and how the engines schedule it."""

from __future__ import annotations

import dataclasses

from rosa2_jax.adapt.rosa import RosaConfig
from rosa2_jax.adapt.words import FEEDBACK_TEMPLATE, REFERENCES, RETRIES
from rosa2_jax.engine.methods import METHODS
from rosa2_jax.engine.streams import ADAPTERS
from rosa2_jax.model.generation import SamplingConfig
from rosa2_jax.model.lora import LoraConfig

REWARDS = ("rule", "model")  # the verifier's +1/-1, or a text model's judgement (adapt/judge.py)
MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    method: str  # what a problem given without a method runs
    max_turns: int = 10
    rows: int = 8  # decode rows (the turn engine: its sessions at once), and the largest Weights bucket (--slots)
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
    max_programs: int = 64  # compiled programs held before all are released (engine/host_memory.py); 0: never
    # the token-level engine (engine/token.py); the turn engine ignores these
    sessions: int = 0  # sessions in the pool (0: twice `slots`)
    decode_steps: int = 16  # tokens decoded per device call (over a float32 cache it also ends when a row stops)
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
