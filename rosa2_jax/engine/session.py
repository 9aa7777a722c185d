"""A session: one problem under one method, its history, its turn records, and what a stream sees of a failed turn.

Every random choice of a session (adapter init, sampling, Words retries) is seeded from (seed, problem id, turn),
so a problem's trajectory does not depend on which slot it lands in or what else shares its batch. Between two
turns a session is whole in `Session.snapshot()` (JSON): a stopped run goes on from its last finished turn.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from typing import Any, NamedTuple

import numpy as np

from rosa2_jax.tasks.problem import Problem
from rosa2_jax.tasks.records import ProblemRecord, TurnRecord
from rosa2_jax.tasks.rewards import Verdict


def session_seed(seed: int, problem_id: str, turn: int) -> int:
    digest = hashlib.sha256(f"{seed}/{problem_id}/{turn}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclasses.dataclass
class Session:
    problem: Problem
    method: str
    system_prompt: str
    messages: list[dict] = dataclasses.field(default_factory=list)  # user/assistant turns, system prompt apart
    turn: int = 0
    solved_at: int | None = None
    previous_feedback: str | None = None
    turns: list[TurnRecord] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    response_ids: list[list[int]] = dataclasses.field(default_factory=list)  # each judged turn's tokens
    restored: bool = False  # from a snapshot: its adapter is rebuilt (engine/restore.py) when admitted

    def record(self, dataset: str) -> ProblemRecord:
        return ProblemRecord(self.method, dataset, self.problem.id, self.problem.answer, self.solved_at, self.turns,
                             self.seconds, self.error)

    def snapshot(self) -> dict[str, Any]:
        """The session between two turns, as JSON: everything its next turns depend on."""
        row = {"method": self.method, "problem_id": self.problem.id}
        for name in SNAPSHOT_FIELDS:
            value = getattr(self, name)
            row[name] = [t.to_json() for t in value] if name == "turns" else copy.deepcopy(value)
        return row

    @classmethod
    def from_snapshot(cls, row: dict[str, Any], problem: Problem) -> "Session":
        if row["problem_id"] != problem.id:
            raise ValueError(f"a snapshot of problem {row['problem_id']!r} cannot restore problem {problem.id!r}")
        values = {name: copy.deepcopy(row[name]) for name in SNAPSHOT_FIELDS}
        values["turns"] = [TurnRecord.from_json(t) for t in row["turns"]]
        return cls(problem, row["method"], restored=True, **values)

    def step_norms(self) -> np.ndarray:
        """||Δθ||² of each Weights step the session took so far: what its adapter is the result of."""
        return np.asarray([t.update["step_norm_sq"] for t in self.turns if t.update is not None], np.float64)


# What a snapshot keeps besides the method and problem id: all but the problem itself, an error (a session that
# has one never ran) and `restored`.
SNAPSHOT_FIELDS = ("system_prompt", "messages", "turn", "solved_at", "previous_feedback", "turns", "seconds",
                   "response_ids")

Work = Problem | tuple[str, Problem] | Session  # a problem run with `EngineConfig.method`, (method, problem), or a
# session restored from its snapshot


def method_of(item: tuple[str, Problem] | Session) -> str:
    """The method a queued (method, problem) pair or restored session runs."""
    return item.method if isinstance(item, Session) else item[0]


class Failure(NamedTuple):
    """A session's failed turn, as the streams see it."""

    session: Session
    prompt: list[int]  # the turn's prompt ids
    tokens: list[int]  # the judged response
    response: str
    verdict: Verdict | None  # None when a restore replays the turn's Weights step
