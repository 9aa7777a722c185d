"""Leakage guard: does a rewritten message state or hint at the ground-truth answer?

A rewrite leaks when it contains the answer in any written form: digits (1,000 / 1000 / 1000.0), number
words, LaTeX fractions and radicals, with units, inside or outside \\boxed{}. A number equal to the answer
always leaks in an answer statement ("the answer is 5", "= 5", "should be five"). Elsewhere it is allowed
when it quotes the problem ("Tom starts with 5 apples") or when it is a coincidence of how instructions
are written: list numbering ("2. Check the units"), a reference to a step, line or case ("re-check step
4"), a count of cases, steps or ways ("consider the two cases", but not "four of them"), or a fraction word
used as an operator ("half of the total"). A near-bare message (fewer than four words besides the box
instruction) that holds the answer leaks even when the problem holds the number too. About a quarter of GSM8K
and MATH answers are integers from 0 to 10, so without these exceptions the Words stream would quietly fall
back for them.
"""

from __future__ import annotations

import re

from rosa2_jax.tasks.answers import BOXED_INSTRUCTION, last_boxed, normalize_answer, number_mentions, numeric_value

_ANSWER_CONTEXT = re.compile(
    r"(answer|result|solution|total|equals?|=|:|\\boxed\{|should be|would be|must be|is|get|gives?|obtain)\W{0,3}"
    r"(\w+\W{1,3}){0,2}$", flags=re.I)


_LIST_NUMBER_BEFORE = re.compile(r"(^|\n|[:;.!?]\s|\s\()\s*\(?$")
_LIST_NUMBER_AFTER = re.compile(r"^(\)|[.)]\s)")
_REFERENCE_BEFORE = re.compile(
    r"\b(steps?|lines?|parts?|points?|cases?|items?|stages?|paragraphs?|equations?|eqs?\.|no\.|numbers?|hints?|"
    r"questions?|rules?|phases?|attempts?|turns?|rows?|columns?|sentences?|conditions?|#)\s*#?"
    r"(\w+\s*(,|and|or|to|-|through)\s*)*$", flags=re.I)
_COUNTED_AFTER = re.compile(
    r"^[\s-]*(distinct |separate |different |main |key |possible |more |other |sub-?)?"
    r"(cases?|steps?|ways?|parts?|stages?|scenarios?|possibilit(y|ies)|approach(es)?|methods?|conditions?|"
    r"constraints?|equations?|variables?|quantities|numbers|values|operations?|checks?|things|mistakes?|errors?|"
    r"places|times? (over|through)|"
    r"of the (steps|cases|parts|conditions|quantities|numbers|values))\b", flags=re.I)
_OPERATOR_WORD = re.compile(r"^(half|third|quarter|fourth|fifth|twice|double|triple)s?$", flags=re.I)
_OPERATOR_AFTER = re.compile(r"^\s+(of|as|the)\b", flags=re.I)


def is_label(message: str, start: int, end: int) -> bool:
    """Does the number at message[start:end] name a part of the instructions (list numbering, "step 4",
    "line 5") rather than state a value?"""
    before, after = message[max(0, start - 60): start], message[end: end + 40]
    return bool(_LIST_NUMBER_BEFORE.search(before) and _LIST_NUMBER_AFTER.search(after)
                or _REFERENCE_BEFORE.search(before))


def is_count(message: str, start: int, end: int) -> bool:
    """Does it count cases, steps or ways ("the two cases"), or is it a fraction word used as an
    operator ("half of the total")?"""
    after = message[end: end + 40]
    return bool(_COUNTED_AFTER.search(after)
                or _OPERATOR_WORD.match(message[start:end].strip()) and _OPERATOR_AFTER.search(after))


def same_value(a: float, b: float) -> bool:
    """Equal as the guard and the Words checks compare numbers (relative tolerance 1e-6)."""
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
        in_problem = any(same_value(v, value) for v, _, _ in number_mentions(problem))
        near_bare = len(re.findall(r"[A-Za-z]{3,}", message.replace(BOXED_INSTRUCTION, ""))) < 4
        for v, start, end in number_mentions(message):
            if not same_value(v, value):
                continue
            if near_bare:  # "5 Put your final answer within \boxed{}.": a dictation, whatever the problem holds
                return True
            if is_label(message, start, end):
                continue
            if _ANSWER_CONTEXT.search(message[max(0, start - 40): start]):
                return True
            if not in_problem and not is_count(message, start, end):
                return True
        return False
    compact = _compact(gt)
    letter = compact.strip("().")
    if len(letter) == 1 and letter.isalpha():  # a choice letter: "(B)", "option B", "B." (upper case only)
        return re.search(rf"(?<![A-Za-z]){letter.upper()}(?![A-Za-z])", message) is not None
    return len(compact) >= 2 and compact in _compact(message)
