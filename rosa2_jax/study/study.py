"""A study: methods x problems of one data set in a run folder, resumable, shared over processes.

`Study` owns what a run folder promises: its settings do not change under it (`check_config`), every problem of
every method is run once (finished records are never redone, sessions in flight go on from their last finished
turn), work is admitted block by block so that a study stopped anywhere has every method on nearly the same
problems, and `stop` (e.g. from a signal) finishes the sessions in flight and admits no more. Process 0 merges
every process's records and writes the report.

    study = Study(run_dir, StudyConfig(dataset="gsm8k", methods=("baseline", "rosa2"), num_problems=100))
    study.check_config(settings, defaults)     # process 0: refuse a folder run with other settings
    study.prepare()                            # problems, finished records, snapshots, this process's share
    summary = study.run(model, text_model, engine_config)
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time
from pathlib import Path
from typing import Any, Callable

import jax

from rosa2_jax.adapt.text_models import TextModel
from rosa2_jax.checkpoint import LoadedModel
from rosa2_jax.distributed import ProcessInfo, barrier, process_info, share
from rosa2_jax.engine import METHODS, SCHEDULERS, Engine, EngineConfig, Session, TokenEngine, method_of
from rosa2_jax.engine.lifecycle import data_shards
from rosa2_jax.errors import Rosa2Error
from rosa2_jax.study.report import write_report
from rosa2_jax.study.runs import (ADAPTER_CACHE, RECORDS, drop_torn_tail, in_flight_path, merge_records,
                                  read_in_flight, read_records, records_path, write_in_flight)
from rosa2_jax.tasks.data import load_problems
from rosa2_jax.tasks.problem import Problem

# Settings that change how a study is scheduled or where it runs, never a problem's trajectory.
SCHEDULING = {"methods", "num_problems", "problems_per_round", "slots", "scheduler", "sessions", "update_batch",
              "decode_steps", "prefill_chunk", "max_programs", "mesh", "distributed", "coordinator_address",
              "num_processes", "process_id", "run_dir", "cache_dir"}


class StudyConfigError(Rosa2Error, ValueError):
    """A run folder holds a study run with other settings."""


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    dataset: str  # a data set name or file (tasks/data.py)
    methods: tuple[str, ...]
    num_problems: int = 0  # drawn with `seed` (0 = all)
    seed: int = 0
    scheduler: str = "token"  # a key of engine.SCHEDULERS
    problems_per_round: int = 0  # admit in blocks of this many problems, every method on a block first (0 = one)
    cache_dir: str | None = None

    def __post_init__(self):
        if unknown := [m for m in self.methods if m not in METHODS]:
            raise ValueError(f"unknown method {unknown[0]!r}; choose from {tuple(METHODS)}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose from {tuple(SCHEDULERS)}")


class Study:
    def __init__(self, run_dir: Path, cfg: StudyConfig, info: ProcessInfo | None = None,
                 log: Callable[[str], None] = print):
        self.run_dir, self.cfg, self.log = Path(run_dir), cfg, log
        self.info = info or process_info()
        self.engine: Engine | None = None
        self.stopped = False
        self.run_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ before the first record
    def check_config(self, settings: dict[str, Any], defaults: dict[str, Any]) -> None:
        """Refuse a folder whose config.json has other settings that would change its trajectories (a setting
        absent from an older config.json is taken at its default, which is what that run used); then write
        `settings` as the folder's config.json."""
        path = self.run_dir / "config.json"
        now = json.loads(json.dumps(settings))  # as config.json holds it (tuples as lists)
        if path.exists():
            before = json.loads(path.read_text())
            then = {k: before.get(k, json.loads(json.dumps(defaults.get(k)))) for k in now}
            changed = {k: (then[k], now[k]) for k in now if k not in SCHEDULING and then[k] != now[k]}
            if changed:
                listed = ", ".join(f"--{k}: {old!r} in the folder, {new!r} now" for k, (old, new) in sorted(changed.items()))
                raise StudyConfigError(f"{self.run_dir} was run with other settings ({listed}); resuming would mix "
                                       "trajectories. Rerun with the folder's settings (its config.json) or use a new "
                                       "--run_dir.")
        path.write_text(json.dumps(settings, indent=2))

    def prepare(self) -> list[tuple[str, Problem] | Session]:
        """This process's work, in order: the sessions a stopped run left in flight (from their last finished
        turn), then (method, problem) pairs block by block. Every process reads the same files here, before
        anyone appends, so the shares are disjoint."""
        cfg = self.cfg
        self.problems, self.report = load_problems(cfg.dataset, limit=cfg.num_problems or None, seed=cfg.seed,
                                                   cache_dir=cfg.cache_dir)
        if self.report.skipped and self.info.is_main:
            self.log(f"skipped {len(self.report.skipped)} malformed rows of {cfg.dataset} "
                     f"(first: {self.report.skipped[0]})")
        drop_torn_tail(records_path(self.run_dir, self.info))
        self.done = {(r["method"], r["problem_id"]) for r in read_records(self.run_dir)}
        self.snapshots = {key: row for key, row in read_in_flight(self.run_dir).items() if key not in self.done}
        barrier("records read")
        todo = {m: share([p for p in self.problems if (m, p.id) not in self.done], self.info) for m in cfg.methods}
        block = cfg.problems_per_round or len(self.problems)
        block_of = {p.id: k // block for k, p in enumerate(self.problems)}
        work = sorted(((m, p) for m in cfg.methods for p in todo[m]), key=lambda mp: block_of[mp[1].id])
        self.restored = [Session.from_snapshot(self.snapshots[m, p.id], p) for m, p in work
                         if (m, p.id) in self.snapshots]
        self.work = self.restored + [(m, p) for m, p in work if (m, p.id) not in self.snapshots]
        if self.done:
            self.log(f"resuming {self.run_dir}: {len(self.done)} problem runs already finished")
        if self.restored:
            self.log(f"restoring {len(self.restored)} sessions in flight after "
                     f"{sum(s.turn for s in self.restored)} finished turns")
        if self.info.count > 1:
            self.log(f"process {self.info.index} of {self.info.count}: {len(self.work)} problem runs to do")
        return self.work

    # ------------------------------------------------------------------ the run
    def stop(self) -> None:
        """Finish the sessions in flight and admit no more (safe from a signal handler); a later run of the same
        study does the rest."""
        self.stopped = True
        if self.engine is not None:
            self.engine.stop_admitting()

    def run(self, model: LoadedModel, text_model: TextModel | None, engine_cfg: EngineConfig,
            on_record: Callable[[Session], None] = lambda s: None, meta: dict[str, Any] | None = None) -> dict | None:
        """Run this process's work (`prepare` first) with one engine for every method, appending each finished
        problem to this process's records; process 0 then merges every process's records and writes the
        report, whose summary it returns."""
        start = time.time()
        if self.work:
            self._run_engine(model, text_model, engine_cfg, on_record)
        wall = time.time() - start
        barrier("sweep finished")
        if not self.info.is_main:
            return None
        all_records = merge_records(self.run_dir)
        wanted = {p.id for p in self.problems}
        records = [r for r in all_records if r["method"] in self.cfg.methods and r["problem_id"] in wanted]
        meta = {"wall_seconds_this_run": wall,
                "problems_per_hour_this_run": 3600 * (len(all_records) - len(self.done)) / max(wall, 1e-9),
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "processes": self.info.count, "mesh": dict(model.mesh.shape) if model.mesh is not None else None,
                "devices": [str(d) for d in jax.devices()], "dataset": self.cfg.dataset,
                "text_model": text_model.name if text_model else None,
                "dataset_skipped_rows": len(self.report.skipped)} | (meta or {})
        summary, md = write_report(self.run_dir, records, engine_cfg.max_turns, meta,
                                   {p.id: p.question for p in self.problems})
        self.log(md)
        self.log(f"\nwall {wall:.0f} s this run, peak RSS {meta['peak_rss_gib']:.1f} GiB (process 0); "
                 f"records in {self.run_dir / RECORDS}")
        return summary

    def _run_engine(self, model: LoadedModel, text_model: TextModel | None, engine_cfg: EngineConfig,
                    on_record: Callable[[Session], None]) -> None:
        """One engine over the work; its rows hold sessions of several methods at once, so that no method's last
        sessions decode alone. A problem's trajectory does not depend on its row, so a small run uses only the
        rows it fills (rounded up to split evenly over the mesh's data axis)."""
        data = data_shards(model)
        rows = -(-min(engine_cfg.rows, len(self.work)) // data) * data
        cfg = dataclasses.replace(engine_cfg, method=method_of(self.work[0]), rows=rows)
        own_in_flight = in_flight_path(self.run_dir, self.info)
        in_flight = {(s.method, s.problem.id): self.snapshots[s.method, s.problem.id] for s in self.restored}
        write_in_flight(own_in_flight, in_flight.values())  # this process's share, the rest dropped

        def ready(session: Session):
            in_flight[session.method, session.problem.id] = session.snapshot()
            write_in_flight(own_in_flight, in_flight.values())

        with open(records_path(self.run_dir, self.info), "a") as out:
            def finish(session: Session):
                out.write(json.dumps(session.record(self.cfg.dataset).to_json()) + "\n")
                out.flush()
                if in_flight.pop((session.method, session.problem.id), None) is not None:
                    write_in_flight(own_in_flight, in_flight.values())
                on_record(session)

            # The adapters of sessions in flight, for a restart on this machine (not committed: a restore
            # elsewhere runs their Weights steps again from in_flight.jsonl).
            with SCHEDULERS[self.cfg.scheduler](model, cfg, text_model, self.run_dir / ADAPTER_CACHE) as engine:
                self.engine = engine
                if self.stopped:
                    engine.stop_admitting()
                try:
                    engine.run(self.work, finish, ready)
                finally:
                    self.engine = None
                if not engine.admitting:
                    self.log(f"stopped early: {len(engine.queue)} problem runs were not admitted "
                             "(rerun the same command to do them)")
                if isinstance(engine, TokenEngine):
                    self.log(f"all problems of this run: {engine.stats}")
