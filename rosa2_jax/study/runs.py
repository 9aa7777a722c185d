"""The resumable record store of a sweep: one JSON line per finished (method, problem), and the snapshots of the
sessions in flight.

A record is appended and flushed as soon as its problem finishes, so a killed run loses at most the line
being written; a rerun cuts that torn line and skips every finished problem. The sessions not finished are
in `in_flight.jsonl`, each as of its last finished turn (`engine.Session.snapshot`), rewritten whole at
every turn's end: a rerun restores them, so a kill loses only the turns being generated or adapted (their
adapters come from `adapter_cache/` on the same machine, else from their Weights steps run again). In a
multi-process run each process writes its own files, and process 0 merges the records at the end.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import IO, Iterable

from rosa2_jax.distributed import ProcessInfo
from rosa2_jax.errors import Rosa2Error

RECORDS = "records.jsonl"
IN_FLIGHT = "in_flight.jsonl"
ADAPTER_CACHE = "adapter_cache"  # the engine's saved adapters of the sessions in flight (never committed)


def records_path(run_dir: Path, info: ProcessInfo) -> Path:
    """records.jsonl, or one file per process in a multi-process run (merged at the end)."""
    return run_dir / (RECORDS if info.count == 1 else f"records.process-{info.index}.jsonl")


class RunInUse(RuntimeError):
    """Another sweep holds the folder."""


def lock_run(run_dir: Path, info: ProcessInfo) -> IO:
    """This process's lock on `run_dir`, held while the returned file is open; the kernel drops it when the
    process dies, even by SIGKILL. Two sweeps writing one folder would run its problems twice and overwrite
    each other's in-flight sessions, so a second one is refused, naming the holder."""
    path = run_dir / (".sweep.lock" if info.count == 1 else f".sweep.process-{info.index}.lock")
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise RunInUse(f"{run_dir} is being written by another sweep ({holder}); wait for it to end or stop it "
                       "(`kill -USR1 <pid>` finishes its sessions in flight), then rerun") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


def in_flight_path(run_dir: Path, info: ProcessInfo) -> Path:
    """in_flight.jsonl, or one file per process in a multi-process run."""
    return run_dir / (IN_FLIGHT if info.count == 1 else f"in_flight.process-{info.index}.jsonl")


def write_in_flight(path: Path, snapshots: Iterable[dict]) -> None:
    """The sessions in flight, one snapshot per line, written whole and then renamed (a kill mid-write keeps
    the previous file); no sessions, no file."""
    lines = "".join(json.dumps(row) + "\n" for row in snapshots)
    if not lines:
        path.unlink(missing_ok=True)
        return
    partial = path.with_name(path.name + ".partial")
    partial.write_text(lines)
    os.replace(partial, path)


def read_in_flight(run_dir: Path) -> dict[tuple[str, str], dict]:
    """Every in_flight*.jsonl's snapshots by (method, problem); where two files hold one, the later turn."""
    latest: dict[tuple[str, str], dict] = {}
    for path in sorted(run_dir.glob("in_flight*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            key = (row["method"], row["problem_id"])
            if key not in latest or row["turn"] > latest[key]["turn"]:
                latest[key] = row
    return latest


def read_records(run_dir: Path) -> list[dict]:
    """Finished records of every records*.jsonl in run_dir, first copy of each (method, problem) kept; a
    torn last line (killed mid-write) is dropped and redone."""
    records, seen = [], set()
    for path in sorted(run_dir.glob("records*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (r["method"], r["problem_id"]) not in seen:
                seen.add((r["method"], r["problem_id"]))
                records.append(r)
    return records


class NotARunError(Rosa2Error, FileNotFoundError):
    """A folder given as a sweep's has no config.json."""


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """(the sweep's config, its finished records of the config's methods): a folder read on its own, e.g. by the
    commands that report on a study still running."""
    if not (run_dir / "config.json").is_file():
        raise NotARunError(f"{run_dir} is not a sweep's folder: it has no config.json (experiments.math_sweep "
                           "--run_dir=DIR writes one when it starts)")
    config = json.loads((run_dir / "config.json").read_text())
    return config, [r for r in read_records(run_dir) if r["method"] in config["methods"]]


def merge_records(run_dir: Path) -> list[dict]:
    """Every finished record, with the per-process files folded into records.jsonl (written whole, then
    renamed; the process files go only after that, so a crash here loses nothing)."""
    records = read_records(run_dir)
    parts = sorted(run_dir.glob("records.process-*.jsonl"))
    if parts:
        merged = run_dir / (RECORDS + ".partial")
        merged.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(merged, run_dir / RECORDS)
        for part in parts:
            part.unlink()
    return records


def drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (a kill mid-write) so that appended records start on a line of their own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
