"""Leakage guard: does a rewritten message state or hint at the ground-truth answer?

A rewrite leaks when it contains the answer in any written form: digits (1,000 / 1000 / 1000.0), number
words, LaTeX fractions and radicals, with units, inside or outside \\boxed{}. A number that equals the
answer but also occurs in the problem statement is allowed when it is not in an answer statement
("Tom starts with 5 apples" may quote the problem; "the answer is 5" may not).
"""

from __future__ import annotations

import re

from rosa2_jax.answers import last_boxed, normalize_answer, number_mentions, numeric_value

_ANSWER_CONTEXT = re.compile(
    r"(answer|result|solution|total|equals?|=|:|\\boxed\{|should be|would be|must be|is|get|gives?|obtain)\W{0,3}"
    r"(\w+\W{1,3}){0,2}$", flags=re.I)


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def _compact(s: str) -> str:
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    return re.sub(r"[\s$\\{}]", "", s).lower()


def leaks_answer(message: str, ground_truth: str, problem: str = "") -> bool:
    gt = last_boxed(ground_truth) or ground_truth
    boxed = last_boxed(message)
    if boxed is not None and normalize_answer(boxed) == normalize_answer(gt):
        return True
    value = numeric_value(gt)
    if value is not None:
        in_problem = any(_same(v, value) for v, _, _ in number_mentions(problem))
        for v, start, _ in number_mentions(message):
            if _same(v, value):
                if not in_problem or _ANSWER_CONTEXT.search(message[max(0, start - 40): start]):
                    return True
        return False
    compact = _compact(gt)
    letter = compact.strip("().")
    if len(letter) == 1 and letter.isalpha():  # a choice letter: "(B)", "option B", "B." (upper case only)
        return re.search(rf"(?<![A-Za-z]){letter.upper()}(?![A-Za-z])", message) is not None
    return len(compact) >= 2 and compact in _compact(message)
