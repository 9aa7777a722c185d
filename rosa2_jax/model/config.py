"""Model configuration, read from Hugging Face `config.json` fields, and the supported families.

One frozen dataclass describes every supported decoder; `ARCHITECTURES` is the one list of families:
- llama: RMSNorm, RoPE (optionally llama3-style scaled), GQA, SwiGLU, no biases;
- qwen2: llama plus a bias on q/k/v;
- qwen3: llama plus RMSNorm on each query and key head before RoPE, explicit `head_dim`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

from rosa2_jax.errors import CheckpointMismatchError, UnsupportedArchitectureError


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A decoder family: its HF class, the decoder features it turns on, and how its checkpoints differ."""

    hf_class: str
    qkv_bias: bool = False
    qk_norm: bool = False
    gguf_rope_permuted: bool = False  # llama.cpp's converter permutes this family's q/k rows
    hf_config_extra: tuple[tuple[str, Any], ...] = ()  # fields HF needs in config.json to rebuild it
    param_table: Callable[["ModelConfig"], Any] | None = None  # None: params.decoder_param_table


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("LlamaForCausalLM", gguf_rope_permuted=True,
                          hf_config_extra=(("attention_bias", False), ("mlp_bias", False))),
    "qwen2": Architecture("Qwen2ForCausalLM", qkv_bias=True),
    "qwen3": Architecture("Qwen3ForCausalLM", qk_norm=True),
}


def _architecture(model_type: str | None) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; rosa2_jax implements {tuple(ARCHITECTURES)}. "
            "Use a checkpoint of one of these families."
        )
    return ARCHITECTURES[model_type]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (`rope_scaling.rope_type == "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool | None = None  # None: the family's (ARCHITECTURES)
    qk_norm: bool | None = None

    def __post_init__(self):
        arch = _architecture(self.model_type)
        for feature in ("qkv_bias", "qk_norm"):
            if getattr(self, feature) is None:
                object.__setattr__(self, feature, getattr(arch, feature))

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Build from the fields of an HF `config.json` (llama / qwen2 / qwen3)."""
        model_type = hf.get("model_type")
        _architecture(model_type)
        text = hf.get("text_config") or hf
        try:
            num_heads = int(text["num_attention_heads"])
            hidden = int(text["hidden_size"])
            cfg = cls(
                model_type=model_type,
                vocab_size=int(text["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(text["intermediate_size"]),
                num_layers=int(text["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(text.get("num_key_value_heads") or num_heads),
                head_dim=int(text.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_theta(text)),
                max_position_embeddings=int(text.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                rope_scaling=_rope_scaling(text),
            )
        except KeyError as e:
            raise CheckpointMismatchError(
                f"config.json lacks the field {e.args[0]!r} needed for a {model_type} decoder; "
                "the config is incomplete or not a causal-LM config."
            ) from None
        if cfg.num_heads % cfg.num_kv_heads:
            raise CheckpointMismatchError(
                f"num_attention_heads={cfg.num_heads} is not a multiple of num_key_value_heads={cfg.num_kv_heads}."
            )
        return cfg

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
        with open(path) as f:
            return cls.from_hf(json.load(f))

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` fields that reproduce this config."""
        arch = ARCHITECTURES[self.model_type]
        hf: dict[str, Any] = {
            "architectures": [arch.hf_class],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
        }
        hf.update(arch.hf_config_extra)
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return hf


def _rope_params(text: Mapping[str, Any]) -> Mapping[str, Any]:
    # transformers >= 5 nests rope settings under `rope_parameters`; older configs use top-level keys.
    return text.get("rope_parameters") or text.get("rope_scaling") or {}


def _rope_theta(text: Mapping[str, Any]) -> float:
    return text.get("rope_theta") or _rope_params(text).get("rope_theta") or 10000.0


def _rope_scaling(text: Mapping[str, Any]) -> RopeScaling | None:
    rope = _rope_params(text)
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise UnsupportedArchitectureError(
            f"rope_scaling type {rope_type!r} is not supported (supported: default, llama3)."
        )
    return RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )
