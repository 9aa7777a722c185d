"""Read and write HF-format checkpoint folders: config.json plus one or many safetensors shards."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from rosa2_jax.config import ModelConfig
from rosa2_jax.errors import CheckpointMismatchError, CheckpointNotFoundError
from rosa2_jax.model import Params, param_shapes

# our layer param name -> HF name inside `model.layers.{i}.`
_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}
_TOP_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}
# HF nn.Linear weights are (out, in); ours are (in, out). Embeddings are (V, d) in both.
_TRANSPOSED = {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}


def params_from_tensors(cfg: ModelConfig, get: Callable[[str], np.ndarray], source: str) -> Params:
    """Assemble our params pytree (float32 numpy) from HF-named tensors."""
    shapes = param_shapes(cfg)

    def fetch(hf_name: str, ours: str, expected: tuple[int, ...]) -> np.ndarray:
        t = get(hf_name)
        if ours in _TRANSPOSED:
            t = t.T
        if tuple(t.shape) != tuple(expected):
            raise CheckpointMismatchError(
                f"{source}: tensor {hf_name!r} has shape {tuple(t.shape)} but config.json implies "
                f"{tuple(expected)}; the weights and config.json belong to different models."
            )
        return np.asarray(t, np.float32)

    params: Params = {}
    for ours, hf_name in _TOP_NAMES.items():
        if ours in shapes:
            params[ours] = fetch(hf_name, ours, shapes[ours])
    params["layers"] = {
        ours: np.stack([fetch(f"model.layers.{i}.{_LAYER_NAMES[ours]}", ours, shape[1:]) for i in range(cfg.num_layers)])
        for ours, shape in shapes["layers"].items()
    }
    return params


def tensors_from_params(cfg: ModelConfig, params: Params) -> Iterator[tuple[str, np.ndarray]]:
    """HF-named tensors (inverse of `params_from_tensors`)."""
    for ours, hf_name in _TOP_NAMES.items():
        if ours in params:
            t = np.asarray(params[ours], np.float32)
            yield hf_name, (t.T if ours in _TRANSPOSED else t)
    for ours, stacked in params["layers"].items():
        for i in range(cfg.num_layers):
            t = np.asarray(stacked[i], np.float32)
            yield f"model.layers.{i}.{_LAYER_NAMES[ours]}", (t.T if ours in _TRANSPOSED else t)


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointNotFoundError(
            f"{folder} has no *.safetensors weights. Convert .bin/.pth weights to safetensors "
            "(transformers: model.save_pretrained(folder, safe_serialization=True)) or pass a GGUF file."
        )
    return files


def load_hf_folder(folder: str | os.PathLike) -> tuple[ModelConfig, Params]:
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointNotFoundError(
            f"{folder} has no config.json; pass the folder that save_pretrained() wrote "
            "(config.json beside the *.safetensors files)."
        )
    cfg = ModelConfig.from_json_file(config_path)
    location: dict[str, Path] = {}
    handles = {}
    try:
        for path in _shard_files(folder):
            if not path.exists():
                raise CheckpointMismatchError(
                    f"{path.name} is listed in model.safetensors.index.json but missing from {folder}; "
                    "the download is incomplete, fetch the missing shard."
                )
            handles[path] = safe_open(str(path), framework="numpy")
            for name in handles[path].keys():
                location[name] = path
    except SafetensorError as e:
        raise CheckpointMismatchError(
            f"cannot read safetensors in {folder}: {e}. The file is truncated or corrupt; download it again."
        ) from None

    def get(name: str) -> np.ndarray:
        if name not in location:
            raise CheckpointMismatchError(
                f"{folder}: tensor {name!r} is missing; the checkpoint does not match its "
                f"{cfg.model_type} config.json (or is truncated)."
            )
        try:
            return handles[location[name]].get_tensor(name)
        except (SafetensorError, TypeError) as e:
            raise CheckpointMismatchError(f"{folder}: cannot read {name!r}: {e}; download it again.") from None

    return cfg, params_from_tensors(cfg, get, str(folder))


def save_hf_folder(folder: str | os.PathLike, cfg: ModelConfig, params: Params) -> Path:
    """Write config.json and model.safetensors that HF transformers loads (used for parity checks)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "config.json", "w") as f:
        json.dump(cfg.to_hf(), f, indent=2)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors_from_params(cfg, params)},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
