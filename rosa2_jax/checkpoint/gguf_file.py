"""GGUF checkpoints, read with the `gguf` package and dequantised to float32.

llama.cpp's converter permutes the rows of q_proj and k_proj of Llama models (for its rope layout);
`unpermute_qk` undoes that. Qwen2/Qwen3 files are stored unpermuted.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from rosa2_jax.checkpoint.hf_folder import params_from_tensors
from rosa2_jax.errors import CheckpointMismatchError, CheckpointNotFoundError, UnsupportedArchitectureError
from rosa2_jax.model.config import ARCHITECTURES, ModelConfig
from rosa2_jax.model.params import ParamInfo, Params


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute(w, n_head)` on a (out, in) q/k weight (or a 1-D bias)."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise CheckpointNotFoundError(f"GGUF file {path} does not exist; check the path.")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises bare ValueError/IndexError on truncated files
        raise CheckpointMismatchError(
            f"cannot read GGUF {path}: {type(e).__name__}: {e}. The file is truncated or not GGUF; download it again."
        ) from None


def read_metadata(reader) -> dict[str, object]:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        meta[key] = value
    return meta


def config_from_metadata(meta: dict[str, object]) -> dict[str, object]:
    """HF config.json fields from GGUF metadata."""
    arch = str(meta.get("general.architecture"))
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(f"GGUF architecture {arch!r} is not supported {tuple(ARCHITECTURES)}.")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    n_head = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    return {
        "model_type": arch,
        "vocab_size": int(get("vocab_size") or len(meta["tokenizer.ggml.tokens"])),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "head_dim": int(get("attention.key_length", hidden // n_head)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
    }


def load_gguf(path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
              progress: bool = True) -> tuple[ModelConfig, Params, dict[str, object]]:
    """(config, float32 params, HF config dict) from a GGUF file; writes the tokenizer if asked."""
    import gguf

    path = Path(path)
    reader = _open(path)
    meta = read_metadata(reader)
    hf_config = config_from_metadata(meta)
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise UnsupportedArchitectureError(
            f"{path.name} carries llama.cpp rope_freqs (llama3 rope scaling); load the HF folder of this model instead."
        )
    hf_config["tie_word_embeddings"] = "output.weight" not in tensors
    cfg = ModelConfig.from_hf(hf_config)

    bar = tqdm(total=len(tensors), desc=f"dequantising {path.name}", disable=not progress, unit="tensor")

    def get(info: ParamInfo, layer: int | None) -> np.ndarray:
        name = info.gguf_name if layer is None else (info.gguf_name or "").format(i=layer)
        if name not in tensors:
            raise CheckpointMismatchError(f"{path.name}: tensor {name or info.hf_name!r} is missing; the GGUF is "
                                          "incomplete.")
        t = tensors[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        except (ValueError, IndexError) as e:
            raise CheckpointMismatchError(f"{path.name}: cannot dequantise {t.name}: {e}; the file is damaged.") from None
        if info.gguf_permuted_heads:
            w = unpermute_qk(w, info.gguf_permuted_heads)
        bar.update(1)
        return w

    params = params_from_tensors(cfg, get, path.name)
    bar.close()
    if tokenizer_dir is not None:
        from rosa2_jax.model.tokenizer import write_tokenizer_from_gguf

        write_tokenizer_from_gguf(meta, tokenizer_dir)
    return cfg, params, hf_config
