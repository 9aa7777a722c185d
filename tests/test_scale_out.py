"""Scale-out end to end: a greedy sweep gives the same per-problem results on every mesh of 8 virtual
devices, and two processes on 127.0.0.1 split a sweep, resume their shares and merge to the
single-process result."""

import json
import os
import socket
import subprocess

import pytest
from conftest import tiny_chat_model
from test_sweep import PROBLEMS, ROOT, run, sweep_cmd

pytestmark = pytest.mark.slow  # whole sweeps on three meshes and on two processes (tests/test_sharding.py: the mesh)
METHODS = "--methods=baseline,rosa,rosa2"


def env_with_devices(n: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


def per_problem(run_dir):
    """(method, problem) -> (solved_at, responses, ||Δθ||² rounded): everything a run decides."""
    out = {}
    for line in (run_dir / "records.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[(r["method"], r["problem_id"])] = (
            r["solved_at"], [t["response"] for t in r["turns"]],
            [round(t["step_norm_sq"], 5) if "step_norm_sq" in t else None for t in r["turns"]])
    return out


@pytest.fixture(scope="module")
def greedy(tmp_path_factory):
    """A tiny model whose greedy answers vary from problem to problem (larger init than HF's 0.02)."""
    base = tmp_path_factory.mktemp("scale-out")
    model = tiny_chat_model(base / "model", initializer_range=0.3)
    data = base / "problems.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in PROBLEMS) + "\n")

    def cmd(run_dir, *extra):  # float32 decode, as sweep_cmd says
        return sweep_cmd(model, data, run_dir) + ["--temperature=0", METHODS, *extra]

    return base, cmd


@pytest.fixture(scope="module")
def mesh_runs(greedy):
    base, cmd = greedy
    runs = {}
    for mesh in ("8,1", "4,2", "1,1"):
        run_dir = base / f"mesh-{mesh}"
        proc = run(cmd(run_dir, f"--mesh={mesh}"), env=env_with_devices(8))
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["run"]["mesh"] == dict(zip(("data", "model"), map(int, mesh.split(","))))
        runs[mesh] = per_problem(run_dir)
    return runs


def test_greedy_sweep_is_identical_on_meshes_8x1_4x2_1x1(mesh_runs):
    reference = mesh_runs["1,1"]
    assert len(reference) == 18
    assert len({tuple(v[1]) for v in reference.values()}) > 6, "answers should differ between problems and methods"
    assert mesh_runs["8,1"] == reference
    assert mesh_runs["4,2"] == reference


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(cmd, run_dir):
    common = cmd(run_dir, f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2")
    procs = [subprocess.Popen(common + [f"--process_id={i}"], cwd=ROOT, env=env_with_devices(2), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs]


def test_two_processes_share_resume_and_merge_to_the_single_process_result(greedy, mesh_runs):
    base, cmd = greedy
    run_dir = base / "two-processes"
    run_dir.mkdir()
    # A run that was interrupted: 4 merged records, 3 + 2 in the per-process files, one torn write.
    finished = (base / "mesh-1,1" / "records.jsonl").read_text().splitlines()
    (run_dir / "records.jsonl").write_text("\n".join(finished[:4]) + "\n")
    (run_dir / "records.process-0.jsonl").write_text("\n".join(finished[4:7]) + "\n")
    (run_dir / "records.process-1.jsonl").write_text("\n".join(finished[7:9]) + '\n{"method": "rosa", "probl')
    outs = run_two_processes(cmd, run_dir)
    shares = [int(line.split(": ")[1].split()[0]) for out in outs for line in out.splitlines()
              if "problem runs to do" in line]
    assert sum(shares) == 9 and min(shares) > 0, outs  # the 9 unfinished runs, split between the two
    assert sorted(p.name for p in run_dir.glob("records*.jsonl")) == ["records.jsonl"]
    assert per_problem(run_dir) == mesh_runs["1,1"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run"]["processes"] == 2 and summary["methods"]["rosa"]["problems"] == 6
