"""GGUF loading: a file written with the `gguf` writer from known (HF) weights, as llama.cpp would."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CHATML, MERGES, SPECIAL, byte_vocab, hf_logits, make_hf_model

from rosa2_jax.checkpoint import load_model
from rosa2_jax.checkpoint.gguf_file import load_gguf
from rosa2_jax.errors import CheckpointMismatchError
from rosa2_jax.model.decoder import forward
from rosa2_jax.model.tokenizer import render_chat


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Llama q/k rows (reference for the inverse)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(path, model, arch: str, pre: str, quantize_embedding: bool = False):
    cfg = model.config
    vocab = byte_vocab()
    assert len(vocab) == cfg.vocab_size
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab)
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(vocab) - len(SPECIAL)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)
    for name, t in model.state_dict().items():
        arr = t.float().numpy()
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{GGUF_NAMES[rest]}"
        else:
            gname = GGUF_NAMES[name]
        if arch == "llama" and rest_is(name, "q_proj"):
            arr = llama_cpp_permute(arr, cfg.num_attention_heads)
        if arch == "llama" and rest_is(name, "k_proj"):
            arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
        if quantize_embedding and gname == "token_embd.weight":
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def rest_is(name: str, proj: str) -> bool:
    return f".self_attn.{proj}." in name


@pytest.fixture(scope="module", params=[("llama", "smollm"), ("qwen2", "qwen2")])
def gguf_case(request, tmp_path_factory):
    arch, pre = request.param
    model = make_hf_model(arch, vocab_size=len(byte_vocab()))
    folder = tmp_path_factory.mktemp(f"gguf-{arch}")
    path = folder / "tiny.gguf"
    write_gguf(path, model, arch, pre)
    return arch, pre, model, path, folder


def test_params_and_qk_unpermutation(gguf_case):
    arch, _, model, path, _ = gguf_case
    cfg, params, _ = load_gguf(path, progress=False)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    for i in range(cfg.num_layers):
        np.testing.assert_array_equal(params["layers"]["q"][i], sd[f"model.layers.{i}.self_attn.q_proj.weight"].T)
        np.testing.assert_array_equal(params["layers"]["k"][i], sd[f"model.layers.{i}.self_attn.k_proj.weight"].T)
    if arch == "qwen2":
        np.testing.assert_array_equal(params["layers"]["k_bias"][1], sd["model.layers.1.self_attn.k_proj.bias"])
    np.testing.assert_array_equal(params["embed"], sd["model.embed_tokens.weight"])


def test_logits_match_hf(gguf_case):
    _, _, model, path, _ = gguf_case
    cfg, params, _ = load_gguf(path, progress=False)
    ids = list(range(40, 63))
    ours = forward(jax.tree.map(jnp.asarray, params), jnp.asarray([ids]), jnp.ones((1, len(ids)), bool), cfg=cfg)
    np.testing.assert_allclose(np.asarray(ours[0]), hf_logits(model, ids), atol=1e-4, rtol=0)


def test_quantised_tensor_is_dequantised(tmp_path):
    model = make_hf_model("llama", vocab_size=len(byte_vocab()))
    path = tmp_path / "q8.gguf"
    write_gguf(path, model, "llama", "smollm", quantize_embedding=True)
    _, params, _ = load_gguf(path, progress=False)
    ref = model.state_dict()["model.embed_tokens.weight"].numpy()
    expected = gguf.quants.dequantize(gguf.quants.quantize(ref, gguf.GGMLQuantizationType.Q8_0),
                                      gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(params["embed"], expected)
    assert 0 < np.abs(params["embed"] - ref).max() < 0.01 * np.abs(ref).max()


def test_tokenizer_rebuilt_from_metadata(gguf_case):
    _, pre, _, path, folder = gguf_case
    loaded = load_model(str(path))
    tok = loaded.tokenizer
    vocab = byte_vocab()
    ids = tok.encode("the 42 the", add_special_tokens=False)
    # "the" -> t + he (no leading space), digits one by one for smollm, " the" -> Ġthe through both merges.
    digits = ["4", "2"]
    assert [vocab[i] for i in ids] == ["t", "he", "Ġ", *digits, "Ġthe"]
    text = "Héllo wörld ✓ 12.5\n\tend"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.encode("<|im_start|>user", add_special_tokens=False)[0] == 1
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    chat = render_chat(tok, [{"role": "user", "content": "hi"}])
    assert tok.decode(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_truncated_gguf_is_reported(gguf_case, tmp_path):
    _, _, _, path, _ = gguf_case
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointMismatchError, match="truncated"):
        load_gguf(cut, progress=False)
