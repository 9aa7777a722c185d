"""Read and write HF-format checkpoint folders: config.json plus one or many safetensors shards."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from rosa2_jax.errors import CheckpointMismatchError, CheckpointNotFoundError
from rosa2_jax.model.config import ModelConfig
from rosa2_jax.model.params import ParamInfo, Params, is_info, param_table


def _name(name: str, layer: int | None) -> str:
    return name if layer is None else name.format(i=layer)


def params_from_tensors(cfg: ModelConfig, get: Callable[[ParamInfo, int | None], np.ndarray], source: str) -> Params:
    """Assemble our params pytree (float32 numpy) from checkpoint tensors: `get(info, layer)` returns the
    tensor of that record (of that layer, for stacked ones) in the checkpoint's (HF) layout."""

    def fetch(info: ParamInfo, layer: int | None) -> np.ndarray:
        t = get(info, layer)
        if info.transposed:
            t = t.T
        expected = info.shape[1:] if info.stacked else info.shape
        if tuple(t.shape) != tuple(expected):
            raise CheckpointMismatchError(
                f"{source}: tensor {_name(info.hf_name, layer)!r} has shape {tuple(t.shape)} but config.json "
                f"implies {tuple(expected)}; the weights and config.json belong to different models."
            )
        return np.asarray(t, np.float32)

    def assemble(info: ParamInfo) -> np.ndarray:
        if info.stacked:
            return np.stack([fetch(info, i) for i in range(cfg.num_layers)])
        return fetch(info, None)

    return jax.tree.map(assemble, param_table(cfg), is_leaf=is_info)


def tensors_from_params(cfg: ModelConfig, params: Params) -> Iterator[tuple[str, np.ndarray]]:
    """HF-named tensors (inverse of `params_from_tensors`)."""
    infos, treedef = jax.tree.flatten(param_table(cfg), is_leaf=is_info)
    for info, value in zip(infos, treedef.flatten_up_to(params)):
        value = np.asarray(value, np.float32)
        for layer, t in (enumerate(value) if info.stacked else [(None, value)]):
            yield _name(info.hf_name, layer), (t.T if info.transposed else t)


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

    def get(info: ParamInfo, layer: int | None) -> np.ndarray:
        name = _name(info.hf_name, layer)
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
