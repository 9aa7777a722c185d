"""The resumable record store of a sweep: one JSON line per finished (method, problem).

A record is appended and flushed as soon as its problem finishes, so a killed run loses at most the line
being written; a rerun cuts that torn line and skips every finished problem. In a multi-process run each
process appends to its own file, and process 0 merges them at the end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rosa2_jax.distributed import ProcessInfo

RECORDS = "records.jsonl"


def records_path(run_dir: Path, info: ProcessInfo) -> Path:
    """records.jsonl, or one file per process in a multi-process run (merged at the end)."""
    return run_dir / (RECORDS if info.count == 1 else f"records.process-{info.index}.jsonl")


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
