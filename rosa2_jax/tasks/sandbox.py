"""Run untrusted (model-written) Python in a separate process with limits and no network.

- a fresh interpreter (`python -I`, isolated: no site, no env paths) in a temporary working directory;
- no network: a new network namespace (`unshare -rn`) where available, and sockets disabled inside
  the child either way;
- limits: address space (memory), CPU seconds, file size, and a wall-clock timeout that kills the
  whole process group.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile

_PREAMBLE = """\
import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")
_socket.socket = _no_network
_socket.create_connection = _no_network
del _socket, _no_network
"""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # passed | failed | timeout | error
    detail: str


@functools.lru_cache(maxsize=1)
def _network_namespace_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0


def _limits(memory_bytes: int, cpu_seconds: int):
    def apply():
        os.setsid()
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 << 20, 10 << 20))
    return apply


def run_python(program: str, *, timeout: float = 10.0, memory_mb: int = 512, cpu_seconds: int = 10) -> SandboxResult:
    with tempfile.TemporaryDirectory(prefix="rosa2-sandbox-") as workdir:
        path = os.path.join(workdir, "program.py")
        with open(path, "w") as f:
            f.write(_PREAMBLE + program)
        cmd = [sys.executable, "-I", path]
        if _network_namespace_available():
            cmd = ["unshare", "-rn"] + cmd
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_limits(memory_mb << 20, cpu_seconds))
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return SandboxResult(False, "timeout", f"killed after {timeout:.0f} s")
    if proc.returncode == 0:
        return SandboxResult(True, "passed", "")
    tail = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    status = "timeout" if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL) else "failed"
    return SandboxResult(False, status, tail[0][:300])
