"""The model-based reward: a text model judges a response against the reference answer (spec 4.4 [PROP]).

The paper's copy is cut before it describes its model-based reward; the ROSA reviewers report that it did
better than the rule-based one under LoRA updates. Here the judge sees the problem, the reference answer
and the response, and answers CORRECT or INCORRECT; anything else counts as -1. Accuracy is still
measured by the rule-based verifier, so runs with either reward are compared on the same scale.
"""

from __future__ import annotations

import re
from typing import Sequence

from rosa2_jax.adapt.text_models import TextModel
from rosa2_jax.tasks.problem import Problem
from rosa2_jax.tasks.rewards import Verdict

JUDGE_SYSTEM = ("You grade answers to problems. Compare the final answer of the student's response with the "
                "reference answer. Reply with one word: CORRECT if they are the same value, INCORRECT otherwise.")
JUDGE_TOKENS = 8
_WORD = re.compile(r"\b(INCORRECT|CORRECT)\b", re.I)


def _middle(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else text[: limit // 2] + "\n[...]\n" + text[-limit // 2:]


def judge_prompt(problem: Problem, response: str) -> list[dict]:
    user = (f"<PROBLEM>{problem.question}</PROBLEM>\n<REFERENCE_ANSWER>{problem.answer}</REFERENCE_ANSWER>\n"
            f"<STUDENT_RESPONSE>{_middle(response)}</STUDENT_RESPONSE>\n"
            "Is the student's final answer the same as the reference answer? Reply CORRECT or INCORRECT.")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_judgement(text: str | None) -> float | None:
    """+1 / -1 from the judge's first CORRECT / INCORRECT; None when it gave neither."""
    m = _WORD.search(text or "")
    return None if m is None else (1.0 if m.group(1).upper() == "CORRECT" else -1.0)


def judge_rewards(text_model: TextModel, items: Sequence[tuple[Problem, str]]) -> list[Verdict]:
    """The judge's verdict on each (problem, response), in one batched call."""
    if not items:
        return []
    out = text_model.complete([judge_prompt(p, r) for p, r in items], max_tokens=JUDGE_TOKENS, temperature=0.0)
    verdicts = []
    for c in out:
        reward = parse_judgement(c.text)
        detail = f"judge: {c.text!r}" if c.text is not None else f"judge failed: {c.error}"
        verdicts.append(Verdict(-1.0 if reward is None else reward, None, detail))
    return verdicts
