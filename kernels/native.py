"""The CPU kernels' build: C++ sources beside this file, XLA FFI custom calls, compiled on first use with the
system's C++ compiler into <cache>/kernels (`$ROSA2_CACHE`, else ~/.cache/rosa2_jax), once per source, JAX's FFI
header and compiler, loaded into the process and registered with XLA (`load_kernel`). A kernel that cannot be
built leaves its caller on XLA's path."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

from rosa2_jax.fetch import cache_root

log = logging.getLogger(__name__)


def switched_off(variable: str) -> bool:
    """Whether the environment turns a kernel off (`<variable>=off`, `0`, `false` or `no`)."""
    return os.environ.get(variable, "").lower() in ("0", "off", "false", "no")


def x86_linux_cpu() -> bool:
    """Whether JAX computes on an x86-64 Linux CPU, the only place the kernels run."""
    return platform.system() == "Linux" and platform.machine() == "x86_64" and jax.default_backend() == "cpu"


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (those the kernel and the CPU both support)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _build(source: Path, compiler: str) -> Path:
    """The shared library for `source`, the headers beside it, JAX's FFI header and the compiler, compiled once
    (atomically: concurrent processes may race to build it) and kept in the user's cache."""
    header = Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api" / "ffi.h"
    ours = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # the kernels' shared headers
    key = hashlib.sha256(source.read_bytes() + ours + header.read_bytes() + jax.__version__.encode()
                         + compiler.encode()).hexdigest()[:16]
    lib = cache_root() / "kernels" / f"{source.stem}-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=lib.parent, suffix=".so", delete=False) as tmp:
        pass
    cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-Wno-return-type", f"-I{jax.ffi.include_dir()}",
           str(source), "-o", tmp.name]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp.name, lib)
    finally:
        Path(tmp.name).unlink(missing_ok=True)
    return lib


def load_library(source: Path, fallback: str) -> ctypes.CDLL | None:
    """`source` built and loaded, or None with a warning saying why and that `fallback` happens instead."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        log.warning("no C++ compiler (g++) is here to build kernels/%s: %s. Install g++ to use it.", source.name,
                    fallback)
        return None
    try:
        return ctypes.cdll.LoadLibrary(str(_build(source, compiler)))
    except (subprocess.CalledProcessError, OSError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("building kernels/%s failed; %s:\n%s", source.name, fallback, detail[-2000:])
        return None


SIMD_LEVELS = (None, "avx2", "avx512")  # by what simd_targets.h's SimdLevel() returns
SIMD_CPU_FLAGS = {"avx2", "fma"}  # the least a kernel written on simd16.h runs on


def simd_level(source: Path, handlers: dict[str, str], *, switch: str, check: str, fallback: str) -> str | None:
    """The lane code a kernel written on simd16.h runs here, "avx512" or "avx2", or None (`load_kernel`)."""
    return SIMD_LEVELS[load_kernel(source, handlers, switch=switch, cpu=SIMD_CPU_FLAGS, check=check,
                                   fallback=fallback)]


def use_avx512(simd: str | None, available: str, kernel: str) -> bool:
    """The `avx512` attribute of a call of `kernel` on lane code `simd` (None: `available`, the best here)."""
    simd = simd or available
    if simd not in SIMD_LEVELS[1:]:
        raise ValueError(f"{kernel}: simd={simd!r} is not one of {SIMD_LEVELS[1:]}")
    if SIMD_LEVELS.index(simd) > SIMD_LEVELS.index(available):
        raise ValueError(f"{kernel}: simd={simd!r}, but this CPU runs it on {available} at most")
    return simd == "avx512"


def load_kernel(source: Path, handlers: dict[str, str], *, switch: str, cpu: set[str], check: str,
                fallback: str) -> int:
    """What `source`'s `check` symbol returns (nonzero: the CPU and the OS grant what it needs, e.g. an instruction
    set's level) once its handlers (XLA target name -> exported symbol) are registered here; 0 where they are not:
    not an x86-64 Linux CPU with the `cpu` feature flags, `<switch>=off`, or the library not built (a warning says
    that `fallback` happens instead)."""
    if switched_off(switch) or not x86_linux_cpu() or not cpu <= cpu_flags():
        return 0
    lib = load_library(source, fallback)
    level = 0 if lib is None else int(getattr(lib, check)())
    if level:
        for target, symbol in handlers.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return level
