"""Converted checkpoints on disk: config.json, params saved with orbax, tokenizer files beside them.

    <folder>/config.json    HF-style config fields
    <folder>/params/        orbax checkpoint of the float32 params pytree
    <folder>/tokenizer/     tokenizer.json, tokenizer_config.json (chat template inside)

A folder is written under a temporary name and renamed when complete, so an interrupted conversion
never leaves a folder that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rosa2_jax.distributed import local_checkpointer
from rosa2_jax.errors import CheckpointMismatchError
from rosa2_jax.model.config import ModelConfig
from rosa2_jax.model.params import Params, abstract_params


def is_converted_folder(folder: Path) -> bool:
    return (folder / "params").is_dir() and (folder / "config.json").is_file()


def save_converted(folder: str | os.PathLike, hf_config: dict[str, Any], params: Params,
                   tokenizer_dir: str | os.PathLike) -> Path:
    folder = Path(folder)
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with open(partial / "config.json", "w") as f:
        json.dump(hf_config, f, indent=2)
    shutil.copytree(tokenizer_dir, partial / "tokenizer")
    (partial / "tokenizer").chmod(0o755)
    with local_checkpointer() as ckptr:
        ckptr.save((partial / "params").absolute(), jax.tree.map(np.asarray, params))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder


def load_converted(folder: str | os.PathLike, dtype=jnp.float32, mesh: Mesh | None = None) -> tuple[ModelConfig, Params]:
    """Restore params straight onto the device(s): on a mesh into their shardings (each device reads only
    its shard), else onto this process's first device."""
    folder = Path(folder)
    cfg = ModelConfig.from_json_file(folder / "config.json")
    target = abstract_params(cfg, dtype, mesh)
    try:
        with local_checkpointer() as ckptr:
            params = ckptr.restore((folder / "params").absolute(), target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointMismatchError(
            f"the converted checkpoint in {folder} does not match its config.json ({e}); "
            "delete the folder so that it is converted again."
        ) from None
    return cfg, params
