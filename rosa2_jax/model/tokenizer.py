"""Tokenizers and chat templates.

Everything goes through `transformers.AutoTokenizer` loaded from a local folder. For GGUF checkpoints
the folder is written first from the GGUF metadata (vocabulary, merges, token types, pre-tokenizer,
chat template) with the `tokenizers` library.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from rosa2_jax.errors import CheckpointNotFoundError, UnsupportedArchitectureError

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": str}

_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _byte_level_pre_tokenizer(pre: str) -> tuple[normalizers.Normalizer | None, pre_tokenizers.PreTokenizer]:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "smollm":  # digits one by one, then the GPT-2 regex
        return None, pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return normalizers.NFC(), pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"), byte_level]
        )
    if pre in ("llama3", "llama-bpe", "llama-v3"):
        return None, pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level]
        )
    if pre in ("gpt2", "default"):
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False)
    raise UnsupportedArchitectureError(
        f"GGUF pre-tokenizer {pre!r} is not supported (smollm, qwen2, llama3/llama-bpe, gpt2). "
        "Pass an HF folder with its tokenizer.json instead."
    )


def write_tokenizer_from_gguf(meta: Mapping[str, object], out_dir: str | os.PathLike) -> Path:
    """Write tokenizer.json and tokenizer_config.json rebuilt from GGUF `tokenizer.*` metadata."""
    model_kind = meta.get("tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise UnsupportedArchitectureError(
            f"GGUF tokenizer model {model_kind!r} is not supported; only byte-level BPE ('gpt2') is."
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    normalizer, pre = _byte_level_pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "gpt2")))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    )
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))

    def token_of(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(idx)] if idx is not None else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token_of("bos_token_id"),
        "eos_token": token_of("eos_token_id"),
        "unk_token": token_of("unknown_token_id"),
        "pad_token": token_of("padding_token_id") or token_of("eos_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    with open(out / "tokenizer_config.json", "w") as f:
        json.dump({k: v for k, v in config.items() if v is not None}, f, indent=2, ensure_ascii=False)
    return out


def load_tokenizer(folder: str | os.PathLike):
    """AutoTokenizer from a local folder (never the hub)."""
    # torch is deliberately not a runtime dependency: transformers' import-time advice that it is missing would
    # tell a user something is wrong when nothing is. A user's own setting of the variable wins.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        raise CheckpointNotFoundError(
            f"no tokenizer files in {folder}; it needs tokenizer.json and tokenizer_config.json "
            "(save them with tokenizer.save_pretrained(folder))."
        )
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def render_chat(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a multi-turn history rendered with the model's own chat template."""
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return tokenizer.encode(text, add_special_tokens=False)


def stop_token_ids(tokenizer, extra: Sequence[str] = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")) -> tuple[int, ...]:
    """EOS plus the end-of-turn tokens this vocabulary has."""
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id} | {vocab[t] for t in extra if t in vocab}
    return tuple(sorted(i for i in ids if i is not None))
