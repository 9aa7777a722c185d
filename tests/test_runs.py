"""The record store on its own: torn lines, duplicates across process files, merging, in-flight sessions, the
folder's lock; a folder's report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rosa2_jax.distributed import ProcessInfo
from rosa2_jax.study.runs import (IN_FLIGHT, RECORDS, RunInUse, drop_torn_tail, in_flight_path, lock_run, merge_records,
                            read_in_flight, read_records, records_path, write_in_flight)
from rosa2_jax.study.metrics import compare_methods, summarize


def line(method, pid, solved_at=1):
    return json.dumps({"method": method, "problem_id": pid, "solved_at": solved_at, "turns": []}) + "\n"


def test_one_file_per_process_in_a_multi_process_run(tmp_path):
    assert records_path(tmp_path, ProcessInfo(0, 1)) == tmp_path / RECORDS
    assert records_path(tmp_path, ProcessInfo(2, 4)) == tmp_path / "records.process-2.jsonl"


def test_a_torn_last_line_is_cut_and_complete_files_are_left_alone(tmp_path):
    path = tmp_path / RECORDS
    drop_torn_tail(path)  # no file yet: nothing to do
    assert not path.exists()
    whole = line("rosa", "p1") + line("rosa", "p2")
    path.write_text(whole)
    drop_torn_tail(path)
    assert path.read_text() == whole
    path.write_text(whole + '{"method": "rosa", "prob')
    drop_torn_tail(path)
    assert path.read_text() == whole
    path.write_text('{"method": "ro')  # the only line is torn
    drop_torn_tail(path)
    assert path.read_text() == ""


def test_in_flight_sessions_are_rewritten_whole_and_the_latest_turn_wins(tmp_path):
    own, other = in_flight_path(tmp_path, ProcessInfo(0, 1)), tmp_path / "in_flight.process-1.jsonl"
    assert own == tmp_path / IN_FLIGHT and in_flight_path(tmp_path, ProcessInfo(1, 2)) == other
    snap = lambda method, pid, turn: {"method": method, "problem_id": pid, "turn": turn}  # noqa: E731
    write_in_flight(own, [snap("rosa", "p1", 1), snap("words", "p2", 2)])
    write_in_flight(other, [snap("rosa", "p1", 3)])  # shares moved between processes: the later turn counts
    assert read_in_flight(tmp_path) == {("rosa", "p1"): snap("rosa", "p1", 3), ("words", "p2"): snap("words", "p2", 2)}
    write_in_flight(own, [snap("words", "p2", 3)])  # rewritten, not appended
    assert read_in_flight(tmp_path)[("words", "p2")]["turn"] == 3 and own.read_text().count("\n") == 1
    write_in_flight(own, [])
    write_in_flight(other, [])
    assert sorted(tmp_path.iterdir()) == [] and read_in_flight(tmp_path) == {}


def test_a_folder_is_held_by_one_sweep_at_a_time(tmp_path):
    first = lock_run(tmp_path, ProcessInfo(0, 1))
    with pytest.raises(RunInUse, match=f"being written by another sweep \\(pid {os.getpid()} on "):
        lock_run(tmp_path, ProcessInfo(0, 1))
    lock_run(tmp_path, ProcessInfo(1, 2)).close()  # each process of a multi-process run holds its own
    first.close()
    lock_run(tmp_path, ProcessInfo(0, 1)).close()  # released with its file (or its process)


def test_read_keeps_the_first_copy_of_each_problem_and_skips_torn_lines(tmp_path):
    (tmp_path / RECORDS).write_text(line("rosa", "p1", 1) + line("words", "p1", None) + '{"torn')
    (tmp_path / "records.process-1.jsonl").write_text(line("rosa", "p1", 3) + line("rosa", "p2", 2))
    records = read_records(tmp_path)
    assert [(r["method"], r["problem_id"], r["solved_at"]) for r in records] == [
        ("rosa", "p1", 1), ("words", "p1", None), ("rosa", "p2", 2)]


def test_merge_folds_process_files_into_one_and_loses_nothing(tmp_path):
    (tmp_path / "records.process-0.jsonl").write_text(line("rosa", "p1") + line("rosa", "p3"))
    (tmp_path / "records.process-1.jsonl").write_text(line("rosa", "p2") + line("rosa", "p3", None))
    merged = merge_records(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [RECORDS]
    assert [json.loads(x) for x in (tmp_path / RECORDS).read_text().splitlines()] == merged
    assert {(r["problem_id"], r["solved_at"]) for r in merged} == {("p1", 1), ("p2", 1), ("p3", 1)}
    assert merge_records(tmp_path) == merged  # merging a merged folder changes nothing


def test_report_of_a_folder_is_computed_from_its_records_alone(tmp_path):
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "experiments.report", f"--run_dir={tmp_path}"]
    missing = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "has no config.json" in missing.stderr + missing.stdout

    (tmp_path / "config.json").write_text(json.dumps({"methods": ["rosa", "words"], "max_turns": 3,
                                                      "model": "m", "dataset": "d"}))
    # A method the config does not run, a second copy of a problem, and a torn last line are left out.
    (tmp_path / RECORDS).write_text(line("rosa", "p1", 1) + line("words", "p1", None) + line("rosa", "p2", 3)
                                    + line("words", "p2", 2) + line("switch", "p1", 1) + '{"torn')
    (tmp_path / "records.process-1.jsonl").write_text(line("rosa", "p1", None))
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    kept = [json.loads(line(*r)) for r in [("rosa", "p1", 1), ("words", "p1", None), ("rosa", "p2", 3),
                                           ("words", "p2", 2)]]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["methods"] == json.loads(json.dumps(summarize(kept, 3)))
    assert summary["comparisons"] == json.loads(json.dumps(compare_methods(kept)))
    assert summary["methods"]["rosa"]["accuracy"] == 1.0 and summary["methods"]["words"]["accuracy"] == 0.5
    assert (tmp_path / "summary.md").is_file() and (tmp_path / "accuracy_by_turn.png").is_file()
