"""A problem: the first user message, its reference and how an answer to it is verified."""

from __future__ import annotations

import dataclasses

KINDS = ("math", "gsm8k", "choice", "code")  # how an answer is verified: the keys of rewards.VERIFIERS


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    question: str  # the first user turn's content
    answer: str  # ground truth (for code: the test program)
    kind: str  # one of KINDS
    meta: dict = dataclasses.field(default_factory=dict)  # e.g. "solution": the worked solution, where shipped
