"""Shared fixtures: tiny random HF models (the parity reference) saved to temp folders."""

from __future__ import annotations

import os

# `python -m pytest` puts the checkout's root first on sys.path, where kernels/ would shadow the PyPI package
# `kernels` that transformers imports; importing `experiments` drops the root (see experiments/__init__.py).
import experiments  # noqa: F401, E402

# Set before jax starts its backend, and inherited by the sweeps that tests start as subprocesses (a value already in
# XLA_FLAGS is kept):
# - eight virtual CPU devices, so that the mesh tests place arrays on real (4, 2) and (8, 1) meshes; everything else
#   runs on device 0 as before;
# - no LLVM optimisation of the compiled programs: the suite compiles ~7,200 of them for tiny models and runs each a
#   few times; compiling was most of its time and the optimiser nearly half of a compile (BUILD_NOTES.md, "Install").
#   XLA's own passes (fusion, layout) still run.
TEST_XLA_FLAGS = {"xla_force_host_platform_device_count": "8", "xla_backend_optimization_level": "0"}
for _name, _value in TEST_XLA_FLAGS.items():
    if _name not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_name}={_value}".strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Tests are reference checks: keep matmuls in full float32 on every backend.
jax.config.update("jax_default_matmul_precision", "highest")

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

TINY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama3-rope-tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=True)),
}


def make_hf_model(kind: str, seed: int = 0, **overrides):
    import torch
    import transformers

    config_cls, model_cls, extra = TINY_CONFIGS[kind]
    config = getattr(transformers, config_cls)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0; randomise them so they are tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session", params=list(TINY_CONFIGS))
def tiny_hf(request, tmp_path_factory):
    """(kind, HF torch model, folder it was saved to)."""
    model = make_hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, model, folder


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop the module's compiled programs when it ends. XLA:CPU maps memory for every executable it keeps, and
    one process compiling the whole suite's programs reaches the kernel's limit of 65,530 mappings
    (vm.max_map_count), after which a compile aborts or segfaults."""
    yield
    jax.clear_caches()


@pytest.fixture(scope="session")
def rng():
    return np.random.RandomState(1234)


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]


def byte_vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return SPECIAL + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe"]


def tiny_chat_model(folder, seed: int = 0, **config):
    """An HF folder with a tiny random Llama and a real byte-level BPE tokenizer with a ChatML template."""
    from rosa2_jax.model.tokenizer import write_tokenizer_from_gguf

    vocab = byte_vocab()
    make_hf_model("llama", seed=seed, vocab_size=len(vocab), max_position_embeddings=2048,
                  **config).save_pretrained(folder)
    write_tokenizer_from_gguf({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": vocab,
        "tokenizer.ggml.token_type": [3] * len(SPECIAL) + [1] * (len(vocab) - len(SPECIAL)),
        "tokenizer.ggml.merges": MERGES, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0, "tokenizer.chat_template": CHATML}, folder)
    return folder
