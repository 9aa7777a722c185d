"""Model hub ids (org/name), for users who can reach a hub."""

from __future__ import annotations

from pathlib import Path

from rosa2_jax.errors import HubUnreachableError


def download_from_hub(repo_id: str, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            repo_id, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt"],
        ))
    except Exception as e:  # network errors, offline mode, missing repo: all end here
        raise HubUnreachableError(
            f"could not fetch {repo_id!r} from the model hub ({type(e).__name__}: {str(e)[:300]}). "
            "Check the network / HF_ENDPOINT / HF_TOKEN, or download the model elsewhere and pass its "
            "local folder, or use a built-in model (smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct)."
        ) from None
