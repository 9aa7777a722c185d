"""Extension points: a new model family is one parameter table; a new kind of adaptation is one `Stream`
class and one `METHODS` row; the Pallas kernels install inside the package."""

import dataclasses
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors import safe_open

from conftest import tiny_chat_model
from rosa2_jax.checkpoint import load_model, save_hf_folder
from rosa2_jax.checkpoint.hf_folder import load_hf_folder
from rosa2_jax.engine import METHODS, Adaptation, EngineConfig, Stream, TurnEngine
from rosa2_jax.engine.streams import Weights, completed
from rosa2_jax.model.config import ARCHITECTURES, Architecture, ModelConfig
from rosa2_jax.model.decoder import forward
from rosa2_jax.model.generation import SamplingConfig
from rosa2_jax.model.params import decoder_param_table, init_params, is_info
from rosa2_jax.tasks.problem import Problem
from rosa2_jax.study.metrics import summarize

ROOT = Path(__file__).resolve().parents[1]


def test_a_new_family_is_one_parameter_table(tmp_path, monkeypatch):
    """A made-up family: the decoder with both q/k norms and q/k/v biases (no built-in family has both),
    stored under tensor names of its own."""
    def tinyfam_table(cfg):
        def rename(info):
            return dataclasses.replace(info, hf_name=info.hf_name.replace("model.layers.", "backbone.blocks.")
                                       .replace("model.", "backbone."), gguf_name=None)
        return jax.tree.map(rename, decoder_param_table(cfg), is_leaf=is_info)

    monkeypatch.setitem(ARCHITECTURES, "tinyfam", Architecture("TinyFamForCausalLM", qkv_bias=True, qk_norm=True,
                                                               param_table=tinyfam_table))
    cfg = ModelConfig("tinyfam", vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64,
                      tie_word_embeddings=False)
    params = init_params(cfg, jax.random.key(0))
    assert {"q_bias", "k_bias", "v_bias", "q_norm", "k_norm"} <= set(params["layers"])

    folder = save_hf_folder(tmp_path / "tinyfam", cfg, params)
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
    assert "backbone.blocks.1.self_attn.q_norm.weight" in names and "backbone.embed_tokens.weight" in names
    assert not any(n.startswith("model.") for n in names)

    loaded_cfg, loaded = load_hf_folder(folder)
    assert loaded_cfg == cfg
    tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6]], np.int32)
    valid = np.ones(tokens.shape, bool)
    np.testing.assert_array_equal(np.asarray(forward(loaded, tokens, valid, cfg=loaded_cfg)),
                                  np.asarray(forward(params, tokens, valid, cfg=cfg)))
    # The family's features run: the biases change the logits.
    no_bias = dict(params, layers=dict(params["layers"], q_bias=0 * params["layers"]["q_bias"]))
    assert not np.allclose(forward(no_bias, tokens, valid, cfg=cfg), forward(params, tokens, valid, cfg=cfg))


class Hint(Stream):
    """A made-up kind of adaptation: append a fixed hint to the next user message."""

    HINT = "Hint: read every option again."

    def start(self, failed):
        return completed(({i: self.HINT for i in failed}, 0.0))

    def apply(self, session, record, result, message):
        return f"{message} {result}"


def test_a_new_adaptation_is_one_stream_class_and_one_methods_row(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "hint+rosa", Adaptation((Hint, Weights)))
    model = load_model(str(tiny_chat_model(tmp_path / "model")))
    cfg = EngineConfig(method="hint+rosa", max_turns=2, rows=2, sampling=SamplingConfig(max_new_tokens=6),
                       max_context=512)
    problems = [Problem(f"p{i}", f"Which is right? (A) {i} (B) {i + 1}", "B", "choice") for i in range(3)]
    finished = []
    engine = TurnEngine(model, cfg)
    try:
        engine.run(problems, finished.append)
    finally:
        engine.close()
    records = [s.record("toy") for s in finished]
    assert sorted(r.problem_id for r in records) == ["p0", "p1", "p2"]
    two_turns = [r for r in records if len(r.turns) == 2]
    assert two_turns, "the tiny random model should fail some turn 1"
    for r in two_turns:
        first, second = r.turns
        assert second.user == f"{cfg.feedback} {Hint.HINT}"  # the stream's result reached the next message
        assert first.update is not None and first.step_norm_sq > 0  # ... next to the Weights step
    assert summarize([r.to_json() for r in records], 2)["hint+rosa"]["weights_steps"] == len(two_turns)


def test_kernels_install_inside_the_package_not_as_a_top_level_kernels():
    top_level = importlib.metadata.distribution("rosa2_jax").read_text("top_level.txt").split()
    assert "kernels" not in top_level and "rosa2_jax" in top_level
    probe = ("import importlib.util, rosa2_jax.kernels.lora_matmul as k; s = importlib.util.find_spec('kernels'); "
             "print(k.__file__); print(s.origin if s else None)")
    out = subprocess.run([sys.executable, "-c", probe], cwd="/", capture_output=True, text=True, check=True)
    kernel_file, top_kernels = out.stdout.split()
    assert Path(kernel_file) == ROOT / "kernels" / "lora_matmul.py"
    # a top-level `kernels`, if any, is the PyPI package transformers requires, never this checkout's folder (CI's
    # venv lies inside the checkout, so compare with the folder itself)
    assert top_kernels == "None" or not top_kernels.startswith(str(ROOT / "kernels"))


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_every_family_features_come_from_the_one_list(model_type):
    arch = ARCHITECTURES[model_type]
    cfg = ModelConfig(model_type, 16, 8, 16, 1, 2, 1, 4, 1e-6, 1e4, 32, True)
    assert (cfg.qkv_bias, cfg.qk_norm) == (arch.qkv_bias, arch.qk_norm)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
