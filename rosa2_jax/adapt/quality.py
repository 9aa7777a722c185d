"""How good the Words stream's messages are, measured from what a run records (the sweep's summary and
`experiments.refine` print the same shares).

Per Words step: the message sent, its status, the corrective instruction, the failed answer, the ground truth and,
where known, the problem. The checks are independent of the path that produced the message: a message counts
as instructive only if its instruction passes `instruction_problems` again, and leaks are the guard's verdict on
the message as sent.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Iterable

from rosa2_jax.adapt.instructions import instruction_problems, is_counted
from rosa2_jax.adapt.leakage import leaks_answer, same_value
from rosa2_jax.adapt.words import EXAMPLES, REQUEST, STATUSES, VERDICT
from rosa2_jax.tasks.answers import BOXED_INSTRUCTION, number_mentions, numeric_value

OPENING_WORDS = 3  # a message's opening: the first words of its instruction


@dataclasses.dataclass(frozen=True)
class WordsStep:
    refine: dict  # TurnRecord.refine: status, message, instruction, candidates, tokens
    failed: str | None  # the failed turn's extracted answer
    truth: str | None
    question: str | None = None  # the problem, where the caller has it
    answer_tokens: int | None = None  # the failed answer's length


def is_bare(message: str) -> bool:
    """A message with no word of three or more letters besides the request for a boxed answer: a number or an
    expression ("144", "2x + 5", "200 + 100 = 300"), not an instruction."""
    return re.search(r"[A-Za-z]{3,}", message.replace(BOXED_INSTRUCTION, "").replace(REQUEST, "")) is None


def states_failed(message: str, failed: str | None) -> bool:
    """The message contains the failed answer as a number or term of its own (labels and counts such as "step 2"
    or "one step at a time" are not values, as in `instruction_problems`)."""
    if not failed:
        return False
    value = numeric_value(failed)
    if value is not None:
        return any(same_value(v, value) for v, s, e in number_mentions(message)
                   if not is_counted(message, s, e))
    return re.search(rf"(?<![\w.]){re.escape(failed)}(?![\w]|\.\d)", message) is not None


def opening(step: WordsStep) -> str:
    text = step.refine.get("instruction") or step.refine["message"]
    return " ".join(re.findall(r"[\w'-]+", text.lower())[:OPENING_WORDS])


def words_quality(steps: Iterable[WordsStep]) -> dict | None:
    """Shares over the Words steps (None without any): instructive (an instruction that passes the checks again),
    verdict kept, bare, new numbers (only where the problem is known), failed answer stated, leaks, each status,
    the most common opening's share and the share of distinct openings, and the text model's tokens against the
    failed answers' (in all, and the share of steps that spent more than half their answer's)."""
    steps = list(steps)
    if not steps:
        return None
    n = len(steps)

    def share(flags) -> float:
        flags = list(flags)
        return sum(flags) / len(flags) if flags else None

    known = [s for s in steps if s.question is not None]
    openings = Counter(opening(s) for s in steps)
    statuses = Counter(s.refine["status"] for s in steps)
    spent = [s.refine.get("tokens") for s in steps if s.refine.get("tokens") is not None and s.answer_tokens]
    answers = [s.answer_tokens for s in steps if s.refine.get("tokens") is not None and s.answer_tokens]
    return {
        "steps": n,
        "instructive": share(bool(s.refine.get("instruction")) and (s.question is None or not instruction_problems(
            s.refine["instruction"], s.question, s.failed, [e.instruction for e in EXAMPLES])) for s in steps),
        "verdict_kept": share(VERDICT in s.refine["message"] for s in steps),
        "bare": share(is_bare(s.refine["message"]) for s in steps),
        "new_numbers": share(_new_numbers(s.refine["message"], s.question) for s in known),
        "states_failed": share(states_failed(s.refine["message"], s.failed) for s in steps),
        "leaks": share(leaks_answer(s.refine["message"], s.truth, s.question or "") for s in steps if s.truth),
        "status": {k: statuses[k] / n for k in (*STATUSES, *sorted(set(statuses) - set(STATUSES)))},
        "top_opening": openings.most_common(1)[0][0],
        "top_opening_share": openings.most_common(1)[0][1] / n,
        "distinct_openings": len(openings) / n,
        "tokens_per_answer_token": sum(spent) / sum(answers) if answers else None,
        "over_half_the_answer": share(t > a / 2 for t, a in zip(spent, answers)),
    }


def _new_numbers(message: str, question: str) -> bool:
    """A number in the message, other than a label or a count, that the problem does not hold."""
    given = [v for v, _, _ in number_mentions(question)]
    return any(not any(same_value(v, g) for g in given)
               for v, s, e in number_mentions(message) if not is_counted(message, s, e))
