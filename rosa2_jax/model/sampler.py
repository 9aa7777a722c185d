"""A model ready to chat: weights, tokenizer, stop and pad ids, and the mesh it lives on.

Everything that turns a conversation into tokens and back, and decodes a batch, goes through a
`Sampler`: the session engine, the local text model, `experiments.ask` and the benchmarks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

from jax.sharding import Mesh
from jaxtyping import Array, Float

from rosa2_jax.model.config import ModelConfig
from rosa2_jax.model.decoder import decode_layout
from rosa2_jax.model.generation import Generation, SamplingConfig, generate
from rosa2_jax.model.lora import LoraAdapters
from rosa2_jax.model.params import Params
from rosa2_jax.model.tokenizer import Message, render_chat, stop_token_ids


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    params: Params
    cfg: ModelConfig
    tokenizer: Any  # transformers tokenizer
    mesh: Mesh | None = None  # params are placed on it; rows of a batch are split over its data axis
    decode_dtype: Any = None  # generation's matmul weights (decode_layout); None = the params' own dtype

    @functools.cached_property
    def stop_ids(self) -> tuple[int, ...]:
        return stop_token_ids(self.tokenizer)

    @functools.cached_property
    def pad_id(self) -> int:
        """The tokenizer's pad id, else its first stop id (Llama-3 folders define no pad token)."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.stop_ids[0]

    @functools.cached_property
    def decode_params(self) -> Params:
        """The weights every generation call runs on (decoder.decode_layout): a second copy of the matmul weights
        beside the stacked ones the ROSA update scans over."""
        return decode_layout(self.params, self.decode_dtype)

    def render(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of a conversation in the model's chat template, ready for the assistant's turn."""
        return render_chat(self.tokenizer, messages)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                 seeds: Sequence[int] | None = None, adapters: LoraAdapters | None = None,
                 hidden_offset: Float[Array, "B d"] | None = None) -> list[Generation]:
        """One continuation per prompt; row i samples with seeds[i] (see generation.generate)."""
        return generate(self.decode_params, self.cfg, prompts, sampling, stop_token_ids=self.stop_ids,
                        pad_id=self.pad_id, seeds=seeds, adapters=adapters, hidden_offset=hidden_offset,
                        mesh=self.mesh)
