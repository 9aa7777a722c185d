"""x · Wᵀ on a CPU's AMX tile unit: bfloat16 in, float32 out, the weight packed into tiles once.

XLA CPU already runs a bfloat16 decode matmul through YNNPACK's AMX kernel, but it repacks the weight into the
tile layout at every call: in a 0.5B decode step's MLP, `perf` shows the repacking (`ynn::transpose_x32`) taking
five times as long as the dot itself, the weight read twice and written once. `decoder.decode_layout` packs each
bfloat16 matmul weight once (`pack_tiles`), and a decode step's matmuls call this kernel (an XLA FFI custom call,
`amx_matmul.cc`) on the packed tiles: the weight is read once. Each output tile accumulates over depth in the order
YNNPACK's kernel does, so the results equal XLA's bit for bit on the model's shapes (tests/test_amx_matmul.py).

The kernel is built from source on first use with the system's C++ compiler, into <cache>/kernels (`$ROSA2_CACHE`,
else ~/.cache/rosa2_jax), and is used only where this CPU has AMX-BF16 (`amx_ready`); anywhere else, or with
`ROSA2_JAX_AMX=off`, decoding keeps XLA's matmul. Forward only, one device: a sharded weight keeps XLA's path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from jaxtyping import Array, BFloat16, Float

from rosa2_jax.fetch import cache_root

SOURCE = Path(__file__).with_name("amx_matmul.cc")
TARGET = "rosa2_amx_matmul"
ROWS, COLS, DEPTH = 16, 16, 32  # an AMX tile: 16 rows of x, 16 output columns, 32 bfloat16 of depth

log = logging.getLogger(__name__)


def packable(w: Array) -> bool:
    """Whether a [out, in] weight can be packed: out a multiple of 16, in of 32 (every Qwen2.5/Llama matrix)."""
    return w.ndim == 2 and w.shape[0] % COLS == 0 and w.shape[1] % DEPTH == 0


def pack_tiles(w: BFloat16[Array, "N K"]) -> BFloat16[Array, "N/16 K/32 512"]:
    """[out, in] -> [out/16, in/32, 512]: tile (n, k) is columns 16n.. and depths 32k.. as [16 depth pairs, 16
    columns, 2], the layout TDPBF16PS reads its second operand in."""
    n, k = w.shape
    tiles = w.astype(jnp.bfloat16).reshape(n // COLS, COLS, k // DEPTH, DEPTH // 2, 2)
    return tiles.transpose(0, 2, 3, 1, 4).reshape(n // COLS, k // DEPTH, DEPTH * COLS)


def unpack_tiles(tiles: BFloat16[Array, "N/16 K/32 512"]) -> BFloat16[Array, "N K"]:
    nt, kt, _ = tiles.shape
    return tiles.reshape(nt, kt, DEPTH // 2, COLS, 2).transpose(0, 3, 1, 2, 4).reshape(nt * COLS, kt * DEPTH)


def amx_matmul(x: Float[Array, "M K"], tiles: BFloat16[Array, "N/16 K/32 512"]) -> Float[Array, "M N"]:
    """x (rounded to bfloat16) times the packed weight's transpose, accumulated and returned in float32."""
    if not amx_ready():
        raise RuntimeError("the AMX kernel does not run here (no AMX-BF16, no C++ compiler, or ROSA2_JAX_AMX=off): "
                           "build the decode layout with tiles=False")
    out = jax.ShapeDtypeStruct((x.shape[0], tiles.shape[0] * COLS), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x.astype(jnp.bfloat16), tiles)


def amx_matmul_reference(x: Float[Array, "M K"], tiles: BFloat16[Array, "N/16 K/32 512"]) -> Float[Array, "M N"]:
    return jnp.einsum("mk,nk->mn", x.astype(jnp.bfloat16), unpack_tiles(tiles), preferred_element_type=jnp.float32)


def _build(compiler: str) -> Path:
    """The shared library for this source, JAX's FFI header and the compiler, compiled once (atomically: concurrent
    processes may race to build it) and kept in the user's cache."""
    header = Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api" / "ffi.h"
    key = hashlib.sha256(SOURCE.read_bytes() + header.read_bytes() + jax.__version__.encode()
                         + compiler.encode()).hexdigest()[:16]
    lib = cache_root() / "kernels" / f"amx_matmul-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=lib.parent, suffix=".so", delete=False) as tmp:
        pass
    cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-Wno-return-type", f"-I{jax.ffi.include_dir()}",
           str(SOURCE), "-o", tmp.name]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp.name, lib)
    finally:
        Path(tmp.name).unlink(missing_ok=True)
    return lib


@functools.cache
def amx_ready() -> bool:
    """Whether decode matmuls run on the AMX kernel here: an x86-64 Linux CPU with AMX-BF16, a C++ compiler to
    build it, and no `ROSA2_JAX_AMX=off`. Says why once when a CPU that has AMX cannot use it."""
    if os.environ.get("ROSA2_JAX_AMX", "").lower() in ("0", "off", "false", "no"):
        return False
    if platform.system() != "Linux" or platform.machine() != "x86_64" or jax.default_backend() != "cpu":
        return False
    if "amx_bf16" not in Path("/proc/cpuinfo").read_text():
        return False
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        log.warning("this CPU has AMX, but no C++ compiler (g++) is here to build kernels/amx_matmul.cc: bfloat16 "
                    "decoding keeps XLA's matmul, which repacks every weight at every call. Install g++ to use it.")
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(compiler)))
    except (subprocess.CalledProcessError, OSError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("building kernels/amx_matmul.cc failed; bfloat16 decoding keeps XLA's matmul:\n%s", detail[-2000:])
        return False
    if not lib.rosa2_amx_ready():
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.Rosa2AmxMatmul), platform="cpu")
    return True
