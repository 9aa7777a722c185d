"""The record format of a sweep: one `ProblemRecord` per finished (method, problem), one `TurnRecord` per turn.

The engine writes them, `study/runs.py` stores them as JSON lines, and `study/metrics.py` reads them back. A field
that a turn did not produce (no Weights step, no Words step) is left out of the JSON, not written as null.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class TurnRecord:
    turn: int
    user: str  # the user message this turn answered
    system_prompt: str
    response: str
    extracted: str | None  # the answer the verifier read, if any
    reward: float  # +1 / -1: what the method acted on (EngineConfig.reward)
    response_tokens: int
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    rule_reward: float | None = None  # the rule verifier's, when `reward` came from a text-model judge
    timing: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds of the step's phases
    update: dict[str, Any] | None = None  # the Weights step after this turn (rosa.UpdateStats and counts)
    step_norm_sq: float | None = None  # ||Δθ||² of that step
    refine: dict[str, str | None] | None = None  # the Words step after this turn: status, critique, message
    semantic_shift: float | None = None  # proxy for ||Δx|| of that rewrite

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k in _REQUIRED}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> "TurnRecord":
        return cls(**{k: row[k] for k in _TURN_FIELDS if k in row})


@dataclasses.dataclass
class ProblemRecord:
    method: str
    dataset: str
    problem_id: str
    answer: str
    solved_at: int | None  # first turn judged right, None if never within K
    turns: list[TurnRecord]
    seconds: float  # this problem's share of the wall time of the steps it took part in
    error: str | None = None  # why it could not run (e.g. context overflow), None when it ran

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | {
            "turns": [t.to_json() for t in self.turns]}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> "ProblemRecord":
        """Rows of early runs may lack dataset, answer, turns or seconds."""
        known = {k: row[k] for k in _PROBLEM_FIELDS if k in row}
        return cls(**{"dataset": "", "answer": "", "seconds": 0.0} | known | {
            "turns": [TurnRecord.from_json(t) for t in row.get("turns", [])]})


_TURN_FIELDS = tuple(f.name for f in dataclasses.fields(TurnRecord))
_PROBLEM_FIELDS = tuple(f.name for f in dataclasses.fields(ProblemRecord))
_REQUIRED = {f.name for f in dataclasses.fields(TurnRecord) if f.default is dataclasses.MISSING} | {"timing"}
