"""GGUF checkpoints, read with the `gguf` package and dequantised to float32.

llama.cpp's converter permutes the rows of q_proj and k_proj of Llama models (for its rope layout);
`unpermute_qk` undoes that. Qwen2/Qwen3 files are stored unpermuted.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from rosa2_jax.config import ModelConfig
from rosa2_jax.errors import CheckpointMismatchError, CheckpointNotFoundError, UnsupportedArchitectureError
from rosa2_jax.model import Params

from rosa2_jax.checkpoint.hf_folder import params_from_tensors

_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    parts = gguf_name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER:
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}"
    return None


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
    if arch not in ("llama", "qwen2", "qwen3"):
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} is not supported (llama, qwen2, qwen3)."
        )

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

    by_hf = {hf_name(n): t for n, t in tensors.items() if hf_name(n) is not None}
    bar = tqdm(total=len(by_hf), desc=f"dequantising {path.name}", disable=not progress, unit="tensor")

    def get(name: str) -> np.ndarray:
        if name not in by_hf:
            raise CheckpointMismatchError(f"{path.name}: tensor for {name!r} is missing; the GGUF is incomplete.")
        t = by_hf[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        except (ValueError, IndexError) as e:
            raise CheckpointMismatchError(f"{path.name}: cannot dequantise {t.name}: {e}; the file is damaged.") from None
        if cfg.model_type == "llama" and (".q_proj." in name or ".k_proj." in name):
            w = unpermute_qk(w, cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads)
        bar.update(1)
        return w

    params = params_from_tensors(cfg, get, path.name)
    bar.close()
    if tokenizer_dir is not None:
        from rosa2_jax.tokenizer import write_tokenizer_from_gguf

        write_tokenizer_from_gguf(meta, tokenizer_dir)
    return cfg, params, hf_config
