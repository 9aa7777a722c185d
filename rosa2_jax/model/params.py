"""One record per parameter: shape, logical axes, initializer, checkpoint names and layout.

`param_table(cfg)` is the only description of a model's parameters. Random init, the abstract tree a
checkpoint is restored into, shardings on a mesh, reading and writing HF safetensors and GGUF files,
and LoRA factor sizes all derive from it. A family whose checkpoints name or lay out tensors
differently brings its own table through `Architecture.param_table` (model/config.py).

Layer parameters are stacked along a leading L axis; their names hold `{i}` for the layer index.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, SingleDeviceSharding

from rosa2_jax.model.config import ARCHITECTURES, ModelConfig
from rosa2_jax.model.sharding import named_shardings

Params = dict
INITIALIZERS = ("normal", "ones")


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    shape: tuple[int, ...]  # ours: weights are (in, out), so y = x @ W
    axes: tuple[str | None, ...]  # logical axes (sharding.AXIS_RULES), one per dimension
    hf_name: str  # name in HF safetensors
    gguf_name: str | None = None  # name in llama.cpp GGUF files (None: not stored there)
    transposed: bool = False  # the checkpoints store (out, in), as nn.Linear does
    init: str = "normal"  # random init for tests and benchmarks: normal(0, 0.02) or ones
    gguf_permuted_heads: int = 0  # llama.cpp permuted these rows for its rope layout over this many heads

    def __post_init__(self):
        if len(self.shape) != len(self.axes):
            raise ValueError(f"{self.hf_name}: shape {self.shape} and axes {self.axes} differ in rank")
        if self.init not in INITIALIZERS:
            raise ValueError(f"{self.hf_name}: initializer {self.init!r} not in {INITIALIZERS}")

    @property
    def stacked(self) -> bool:
        """A layer parameter: one tensor per layer in checkpoints, stacked along axis 0 here."""
        return "{i}" in self.hf_name


def is_info(x: Any) -> bool:
    return isinstance(x, ParamInfo)


def decoder_param_table(cfg: ModelConfig) -> Params:
    """The Llama-style decoder of model/decoder.py with HF transformers' and llama.cpp's tensor names."""
    d, L, F = cfg.hidden_size, cfg.num_layers, cfg.intermediate_size
    rope_permuted = ARCHITECTURES[cfg.model_type].gguf_rope_permuted

    def layer(name, shape, axes, hf, gguf, **kw):
        return name, ParamInfo((L, *shape), ("layers", *axes), f"model.layers.{{i}}.{hf}", f"blk.{{i}}.{gguf}", **kw)

    def linear(name, d_in, d_out, axes, hf, gguf, heads=0):
        return layer(name, (d_in, d_out), axes, f"{hf}.weight", f"{gguf}.weight", transposed=True,
                     gguf_permuted_heads=heads if rope_permuted else 0)

    layers = [
        layer("attn_norm", (d,), (None,), "input_layernorm.weight", "attn_norm.weight", init="ones"),
        linear("q", d, cfg.q_dim, ("embed", "q_heads"), "self_attn.q_proj", "attn_q", cfg.num_heads),
        linear("k", d, cfg.kv_dim, ("embed", "kv_heads"), "self_attn.k_proj", "attn_k", cfg.num_kv_heads),
        linear("v", d, cfg.kv_dim, ("embed", "kv_heads"), "self_attn.v_proj", "attn_v"),
        linear("o", cfg.q_dim, d, ("q_heads", "embed"), "self_attn.o_proj", "attn_output"),
        layer("mlp_norm", (d,), (None,), "post_attention_layernorm.weight", "ffn_norm.weight", init="ones"),
        linear("gate", d, F, ("embed", "mlp"), "mlp.gate_proj", "ffn_gate"),
        linear("up", d, F, ("embed", "mlp"), "mlp.up_proj", "ffn_up"),
        linear("down", F, d, ("mlp", "embed"), "mlp.down_proj", "ffn_down"),
    ]
    if cfg.qkv_bias:
        layers += [layer(f"{t}_bias", (dim,), (axis,), f"self_attn.{t}_proj.bias", f"attn_{t}.bias")
                   for t, dim, axis in (("q", cfg.q_dim, "q_heads"), ("k", cfg.kv_dim, "kv_heads"),
                                        ("v", cfg.kv_dim, "kv_heads"))]
    if cfg.qk_norm:
        layers += [layer(f"{t}_norm", (cfg.head_dim,), (None,), f"self_attn.{t}_norm.weight", f"attn_{t}_norm.weight",
                         init="ones") for t in ("q", "k")]
    table = {"embed": ParamInfo((cfg.vocab_size, d), ("vocab", "embed"), "model.embed_tokens.weight",
                                "token_embd.weight"),
             "final_norm": ParamInfo((d,), (None,), "model.norm.weight", "output_norm.weight", init="ones"),
             "layers": dict(layers)}
    if not cfg.tie_word_embeddings:
        table["lm_head"] = ParamInfo((d, cfg.vocab_size), ("embed", "vocab"), "lm_head.weight", "output.weight",
                                     transposed=True)
    return table


def param_table(cfg: ModelConfig) -> Params:
    """The ParamInfo of every parameter, in the params pytree's structure."""
    return (ARCHITECTURES[cfg.model_type].param_table or decoder_param_table)(cfg)


def abstract_params(cfg: ModelConfig, dtype=jnp.float32, mesh: Mesh | None = None) -> Params:
    """ShapeDtypeStructs of every parameter, e.g. to restore into: sharded over `mesh` when given, else on
    this process's first device (without a sharding, orbax would restore host numpy arrays that every jitted
    call copies to the device again)."""
    table = param_table(cfg)
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, table, is_leaf=is_info)
    else:
        shardings = param_shardings(cfg, mesh)
    return jax.tree.map(lambda info, sh: jax.ShapeDtypeStruct(info.shape, dtype, sharding=sh), table, shardings,
                        is_leaf=is_info)


def axis_extents(cfg: ModelConfig) -> dict[str, int]:
    """Size of each sharded logical axis, in whole units (heads, not head_dim x heads): a mesh axis that
    does not divide a unit count replicates that axis rather than splitting a head."""
    return {"vocab": cfg.vocab_size, "q_heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
            "mlp": cfg.intermediate_size}


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Params:
    """NamedSharding of every parameter on `mesh`, from the table's logical axes and the rules table."""
    axes = jax.tree.map(lambda info: info.axes, param_table(cfg), is_leaf=is_info)
    return named_shardings(axes, mesh, axis_extents(cfg))


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random params (each record's initializer) for tests and benchmarks."""
    leaves, treedef = jax.tree.flatten(param_table(cfg), is_leaf=is_info)
    out = [jnp.ones(info.shape, dtype) if info.init == "ones"
           else (0.02 * jax.random.normal(k, info.shape)).astype(dtype)
           for info, k in zip(leaves, jax.random.split(key, len(leaves)))]
    return jax.tree.unflatten(treedef, out)
