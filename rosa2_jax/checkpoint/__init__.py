"""`load_model(spec)`: one entry point for every checkpoint source.

spec is, in order of precedence:
- a built-in name (`smollm2-135m-instruct`, `qwen2.5-coder-0.5b-instruct`);
- a local path: a converted folder, an HF folder (config.json + safetensors), or a .gguf file;
- a hub id `org/name`, fetched when a hub is reachable.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rosa2_jax.checkpoint.builtin import BUILTINS, cache_root, ensure_builtin
from rosa2_jax.checkpoint.gguf_file import load_gguf
from rosa2_jax.checkpoint.hf_folder import load_hf_folder, save_hf_folder
from rosa2_jax.checkpoint.hub import download_from_hub
from rosa2_jax.checkpoint.store import is_converted_folder, load_converted, save_converted
from rosa2_jax.errors import CheckpointNotFoundError
from rosa2_jax.model.config import ModelConfig
from rosa2_jax.model.params import Params, param_shardings
from rosa2_jax.model.sampler import Sampler
from rosa2_jax.model.tokenizer import load_tokenizer

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

__all__ = ["LoadedModel", "load_model", "BUILTINS", "cache_root", "save_hf_folder", "save_converted"]


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
    cfg: ModelConfig
    params: Params
    tokenizer: Any  # transformers tokenizer
    source: str
    mesh: Mesh | None = None  # where params were placed (load_model(mesh=))
    decode_dtype: Any = None  # generation's matmul weights (Sampler.decode_params); None = params' dtype

    @functools.cached_property
    def sampler(self) -> Sampler:
        return Sampler(self.params, self.cfg, self.tokenizer, self.mesh, self.decode_dtype)


def _place(params: Params, cfg: ModelConfig, dtype, mesh: Mesh | None) -> Params:
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    return params if mesh is None else jax.device_put(params, param_shardings(cfg, mesh))


def load_model(spec: str, *, dtype=jnp.float32, cache_dir: str | os.PathLike | None = None,
               mesh: Mesh | None = None, decode_dtype=None) -> LoadedModel:
    """Load `spec`; with `mesh`, params are placed by the logical-axes rules (converted folders and
    built-ins are restored straight into that sharding). `decode_dtype` stores generation's matmul weights
    in that dtype (e.g. bfloat16 beside float32 params; decoder.decode_layout)."""
    model = _load(spec, dtype, cache_dir, mesh)
    return dataclasses.replace(model, decode_dtype=decode_dtype)


def _load(spec: str, dtype, cache_dir: str | os.PathLike | None, mesh: Mesh | None) -> LoadedModel:
    if spec in BUILTINS:
        folder = ensure_builtin(spec, cache_dir)
        cfg, params = load_converted(folder, dtype, mesh)
        return LoadedModel(cfg, params, load_tokenizer(folder / "tokenizer"), f"builtin:{spec}", mesh)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            with tempfile.TemporaryDirectory() as tok_dir:
                cfg, params, _ = load_gguf(path, tokenizer_dir=tok_dir)
                tokenizer = load_tokenizer(tok_dir)
            return LoadedModel(cfg, _place(params, cfg, dtype, mesh), tokenizer, f"gguf:{path}", mesh)
        if path.is_dir() and is_converted_folder(path):
            cfg, params = load_converted(path, dtype, mesh)
            return LoadedModel(cfg, params, load_tokenizer(path / "tokenizer"), f"converted:{path}", mesh)
        if path.is_dir():
            cfg, params = load_hf_folder(path)
            return LoadedModel(cfg, _place(params, cfg, dtype, mesh), load_tokenizer(path), f"hf:{path}", mesh)
        raise CheckpointNotFoundError(f"{path} is neither a checkpoint folder nor a .gguf file.")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        folder = download_from_hub(spec)
        cfg, params = load_hf_folder(folder)
        return LoadedModel(cfg, _place(params, cfg, dtype, mesh), load_tokenizer(folder), f"hub:{spec}", mesh)
    raise CheckpointNotFoundError(
        f"no model {spec!r}: not a built-in ({', '.join(BUILTINS)}), no such local path, and not a hub id "
        "of the form org/name. Check the spelling or the path."
    )
