"""End to end: the sweep on a tiny model and a 6-problem file, every method, kill and resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_chat_model

from rosa2_jax.engine import METHODS
from rosa2_jax.study.metrics import compare_methods, summarize

PROBLEMS = [{"id": f"p{i}", "question": f"Which option is right? (A) {i} (B) {i + 1} (C) {i + 2} (D) {i + 3}",
             "answer": "ABCD"[i % 4], "kind": "choice"} for i in range(6)]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("sweep")
    model = tiny_chat_model(base / "model")
    data = base / "problems.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in PROBLEMS) + "\n")
    return base, model, data


def sweep_cmd(model, data, run_dir):
    """float32 decode: these tests compare records token for token across resumes, schedulers and meshes, which
    bfloat16 decode does not promise (BUILD_NOTES.md, "The decode step against its roofline (issue 36)"). The
    adapter on the tiny model's last layer only, so that the token engine keeps layer 0's cache across Weights
    steps (BUILD_NOTES.md, "The decode step against its roofline (issue 36)" ("The cache across a Weights
    step"))."""
    return [sys.executable, "-m", "experiments.math_sweep", f"--model={model}", f"--dataset={data}",
            f"--run_dir={run_dir}", "--num_problems=0", "--max_turns=3", "--slots=4", "--max_new_tokens=12",
            "--text_model=rule", "--critic_tokens=16", "--rewrite_tokens=16", "--switch_turn=2", "--cg_iters=3",
            "--lora_rank=2", "--lora_layers=last:1", "--max_context=512", "--decode_dtype=float32",
            f"--methods={','.join(METHODS)}"]


def run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, **kw)


def outcomes(run_dir):
    return {(r["method"], r["problem_id"]): (r["solved_at"], [t["response"] for t in r["turns"]])
            for r in written_records(run_dir)}


@pytest.fixture(scope="module")
def full_run(setup):
    base, model, data = setup
    run_dir = base / "full"
    proc = run(sweep_cmd(model, data, run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout


def assert_summary_is_recomputed_from_records(run_dir, records):
    summary = json.loads((run_dir / "summary.json").read_text())
    questions = {p["id"]: p["question"] for p in PROBLEMS}
    assert summary["methods"] == json.loads(json.dumps(summarize(records, 3, questions)))
    assert summary["comparisons"] == json.loads(json.dumps(compare_methods(records)))
    assert {(c["a"], c["b"]) for c in summary["comparisons"]} >= {("rosa2", "baseline"), ("rosa2", "words")}


def test_every_method_runs_and_summary_matches_records(full_run):
    run_dir, stdout = full_run
    records = written_records(run_dir)
    assert {r["method"] for r in records} == set(METHODS)
    n = 6 * len(METHODS)
    assert len(records) == n and len({(r["method"], r["problem_id"]) for r in records}) == n
    assert_summary_is_recomputed_from_records(run_dir, records)
    assert (run_dir / "accuracy_by_turn.png").stat().st_size > 0
    assert (run_dir / "step_norm_by_turn.png").stat().st_size > 0
    assert "| method |" in stdout
    config = json.loads((run_dir / "config.json").read_text())  # every flag of the run, shared ones too
    assert config["max_new_tokens"] == 12 and config["model"].endswith("model") and config["max_turns"] == 3
    for r in records:
        turns = r["turns"]
        assert 1 <= len(turns) <= 3
        assert r["solved_at"] is None or r["solved_at"] == len(turns)
        for t in turns[:-1]:  # every non-final failed turn adapted along the method's axes
            if r["method"] in ("rosa", "rosa2"):
                assert t["update"]["cg_iters"] >= 1 and t["step_norm_sq"] > 0
            if r["method"] in ("words", "rosa2", "words-ref", "rosa2-ref"):
                assert t["refine"]["status"] == "refined" and "semantic_shift" in t
                assert t["refine"]["candidates"] == [{"text": t["refine"]["instruction"], "reasons": []}]
                assert t["refine"]["message"].startswith("Your previous answer is incorrect. Re-read")
            if r["method"] in ("baseline", "resample"):
                assert "update" not in t and "refine" not in t
        if r["method"] == "resample":  # every turn answers the problem afresh: the same prompt, a new draw
            assert len({(t["user"], t["prompt_tokens"]) for t in turns}) == 1
        if r["method"] == "textgrad" and len(turns) > 1:
            assert turns[1]["system_prompt"] != turns[0]["system_prompt"]
        if r["method"] == "switch" and len(turns) == 3:
            assert "refine" in turns[0] and "update" not in turns[0]
            assert "update" in turns[1] and "refine" not in turns[1]


def complete_records(records: Path) -> int:
    """How many records are written whole (a torn last line has no newline)."""
    return records.read_text().count("\n") if records.exists() else 0


def written_records(run_dir: Path) -> list[dict]:
    """Every line of the run's records file, duplicates included (`runs.read_records` would hide them)."""
    return [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]


def wait_for_records(proc, records: Path, count: int, in_flight: Path | None = None) -> None:
    """Until `count` records are written (and, if given, the in-flight file holds a session)."""
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if complete_records(records) >= count and (in_flight is None or in_flight.exists()):
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_then_drained_run_resumes_to_the_same_results(setup, full_run):
    """A kill loses only the turns in progress (and a torn last line): the sessions in flight go on from their
    last finished turn. SIGUSR1 loses nothing: the run finishes the sessions it holds, admits no more, writes
    the summary of what is done and exits 0. The same command then does the rest, to the records of a run
    never stopped."""
    base, model, data = setup
    run_dir = base / "killed"
    records, in_flight = run_dir / "records.jsonl", run_dir / "in_flight.jsonl"
    proc = subprocess.Popen(sweep_cmd(model, data, run_dir), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    # Killed early and drained at its first new record, so that problems are still queued when the signal lands.
    wait_for_records(proc, records, 1, in_flight)
    second = run(sweep_cmd(model, data, run_dir))  # the folder is in use: refused, nothing written
    assert second.returncode != 0 and f"being written by another sweep (pid {proc.pid} on " in second.stderr
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = complete_records(records)
    assert 0 < partial < 6 * len(METHODS), "the run should have been killed mid-way"
    kept = [json.loads(line) for line in in_flight.read_text().splitlines()]
    assert kept and all(row["turn"] >= 1 for row in kept)
    finished = {(r["method"], r["problem_id"]) for r in written_records(run_dir)}
    unfinished = [row for row in kept if (row["method"], row["problem_id"]) not in finished]  # a kill can land
    # between a record and the in-flight file that drops its session
    with open(records, "a") as f:  # a torn write, as a kill during json.dumps would leave
        f.write('{"method": "rosa", "problem_')

    proc = subprocess.Popen(sweep_cmd(model, data, run_dir), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for_records(proc, records, partial + 1)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "already finished" in out and f"restoring {len(unfinished)} sessions in flight" in out
    left = int(re.search(r"stopped early: (\d+) problem runs were not admitted", out)[1])
    drained = written_records(run_dir)
    # Every run admitted before the signal is finished, none after it (how many were still queued depends on
    # the machine's speed; a signal after the last admission leaves none).
    assert len(drained) == 6 * len(METHODS) - left and partial < len(drained)
    assert len({(r["method"], r["problem_id"]) for r in drained}) == len(drained)
    summary = json.loads((run_dir / "summary.json").read_text())  # of what is done
    questions = {p["id"]: p["question"] for p in PROBLEMS}
    assert summary["methods"] == json.loads(json.dumps(summarize(drained, 3, questions)))

    resumed = run(sweep_cmd(model, data, run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{len(drained)} problem runs already finished" in resumed.stdout
    assert outcomes(run_dir) == outcomes(full_run[0])
    assert not in_flight.exists() and not list((run_dir / "adapter_cache").glob("*"))  # every session finished
    assert_summary_is_recomputed_from_records(run_dir, written_records(run_dir))


def test_resuming_with_other_settings_is_refused(setup, full_run):
    base, model, data = setup
    run_dir = full_run[0]
    before = (run_dir / "records.jsonl").read_text()
    proc = run(sweep_cmd(model, data, run_dir) + ["--max_turns=4", "--temperature=0"])
    assert proc.returncode != 0
    assert "--max_turns: 3 in the folder, 4 now" in proc.stderr and "--temperature: 0.7 in the folder, 0.0 now" in proc.stderr
    assert (run_dir / "records.jsonl").read_text() == before
    extended = run(sweep_cmd(model, data, run_dir) + ["--methods=baseline", "--slots=2"])  # scheduling only
    assert extended.returncode == 0 and "already finished" in extended.stdout


def test_bad_dataset_row_is_reported_and_skipped(setup, tmp_path):
    _, model, _ = setup
    data = tmp_path / "bad.jsonl"
    too_long = {"id": "long", "question": "word " * 600, "answer": "A", "kind": "choice"}
    rows = [json.dumps(PROBLEMS[0]), "{not json", json.dumps({"id": "x", "question": "no answer"}), json.dumps(too_long)]
    data.write_text("\n".join(rows) + "\n")
    cmd = sweep_cmd(model, data, tmp_path / "run") + ["--methods=baseline", "--max_turns=1"]
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 2 malformed rows" in proc.stdout
    records = {r["problem_id"]: r for r in written_records(tmp_path / "run")}
    assert set(records) == {"p0", "long"}
    assert records["long"]["error"].startswith("context overflow") and records["long"]["turns"] == []
    assert records["p0"]["error"] is None and len(records["p0"]["turns"]) == 1


def test_unknown_dataset_is_a_clear_error(setup, tmp_path):
    _, model, _ = setup
    proc = run(sweep_cmd(model, "no-such-set", tmp_path / "run"))
    assert proc.returncode != 0 and "unknown data set 'no-such-set'" in proc.stderr


def test_hidden_offset_sweep_applies_the_offset_in_generation(setup, tmp_path):
    """--adapter=hidden end to end, greedy: turn 1 (zero offset) answers as the base model does, and a
    turn after an offset step answers differently from `baseline`, whose prompt is the same."""
    _, model, data = setup
    cmd = sweep_cmd(model, data, tmp_path / "run") + ["--methods=baseline,rosa", "--adapter=hidden",
                                                      "--temperature=0", "--max_step_norm=100"]
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = written_records(tmp_path / "run")
    turns = {(r["method"], r["problem_id"]): r["turns"] for r in records}
    changed = 0
    for (method, pid), rosa_turns in turns.items():
        if method != "rosa":
            continue
        base_turns = turns[("baseline", pid)]
        assert rosa_turns[0]["response"] == base_turns[0]["response"]
        stepped = "update" in rosa_turns[0] and rosa_turns[0]["update"]["step_norm_sq"] > 0
        if stepped and len(rosa_turns) > 1 and len(base_turns) > 1:
            changed += rosa_turns[1]["response"] != base_turns[1]["response"]
    assert changed > 0, "no answer changed after a hidden-offset step"


def test_methods_take_turns_on_blocks_of_problems(setup, tmp_path):
    """--problems_per_round: the problems are admitted block by block, every method on a block before the
    next block. With one row on one device (and one turn) sessions finish in the order they were admitted, so
    a run stopped after the first block has every method on the same problems."""
    _, model, data = setup
    cmd = sweep_cmd(model, data, tmp_path / "run") + ["--methods=baseline,words", "--max_turns=1",
                                                      "--problems_per_round=2", "--slots=1", "--mesh=1,1"]
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = written_records(tmp_path / "run")
    order = [(r["method"], r["problem_id"]) for r in records]
    assert len(order) == 12
    blocks = [order[i: i + 4] for i in range(0, 12, 4)]
    for block in blocks:  # each block: the same two problems under both methods, baseline first
        assert [m for m, _ in block] == ["baseline", "baseline", "words", "words"], order
        assert {p for m, p in block if m == "baseline"} == {p for m, p in block if m == "words"}
