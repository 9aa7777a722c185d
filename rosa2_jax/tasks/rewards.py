"""Verifiers: the reward r ∈ {+1, -1} of a response.

- math: the last \\boxed{} against the ground truth, by math-verify (default) or by the paper's
  Hendrycks string normalisation (`equivalence="string"`, ROSA2 App. C.4);
- gsm8k: the number in the last \\boxed{} (else the last number in the text) against the integer answer;
- choice: the option letter (boxed, "answer is (X)", or the last standalone letter);
- with `boxed_only` (the paper's rule-based reward, App. C.4), gsm8k and choice answers count only inside
  a \\boxed{}: a cut-off answer whose last number happens to be right is -1;
- code: HumanEval unit tests in the sandbox.
Any failure to extract or compare is -1.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

from rosa2_jax.tasks.answers import answers_equal, last_boxed, number_mentions, numeric_value
from rosa2_jax.tasks.problem import KINDS, Problem
from rosa2_jax.tasks.sandbox import run_python

EQUIVALENCES = ("math-verify", "string")


@dataclasses.dataclass(frozen=True)
class Verdict:
    reward: float
    extracted: str | None
    detail: str = ""


def math_equal(answer: str, truth: str, equivalence: str = "math-verify") -> bool:
    if answers_equal(answer, truth):
        return True
    if equivalence == "string":
        return False
    from math_verify import parse, verify

    try:
        gold = parse(f"${truth}$", parsing_timeout=None)
        pred = parse(f"${answer}$", parsing_timeout=None)
        return bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)
    except Exception:  # noqa: BLE001 - an answer math-verify cannot read is not equal
        return False


def _extract_code(response: str) -> str:
    blocks = re.findall(r"```(?:python|py)?\n(.*?)```", response, flags=re.S)
    return blocks[-1] if blocks else response


def _choice(response: str) -> str | None:
    boxed = last_boxed(response)
    if boxed is not None:
        m = re.search(r"[A-J]", re.sub(r"\\text\{([^}]*)\}", r"\1", boxed))
        return m.group(0) if m else None
    m = re.findall(r"answer is:?\s*\(?([A-J])\)?", response, flags=re.I)
    if m:
        return m[-1].upper()
    m = re.findall(r"(?<![A-Za-z])\(?([A-J])\)?(?![A-Za-z])", response)
    return m[-1] if m else None


def _verify_math(problem: Problem, response: str, equivalence: str, code_timeout: float) -> Verdict:
    extracted = last_boxed(response)
    ok = extracted is not None and math_equal(extracted, problem.answer, equivalence)
    return Verdict(1.0 if ok else -1.0, extracted)


def _verify_number(problem: Problem, response: str, equivalence: str, code_timeout: float) -> Verdict:
    extracted = last_boxed(response)
    if extracted is None:
        mentions = number_mentions(response)
        value = mentions[-1][0] if mentions else None
        extracted = None if value is None else f"{value:g}"
    else:
        value = numeric_value(extracted)
    truth = numeric_value(problem.answer)
    ok = value is not None and truth is not None and abs(value - truth) <= 1e-6 * max(1.0, abs(truth))
    return Verdict(1.0 if ok else -1.0, extracted)


def _verify_choice(problem: Problem, response: str, equivalence: str, code_timeout: float) -> Verdict:
    extracted = _choice(response)
    return Verdict(1.0 if extracted == problem.answer.strip().upper() else -1.0, extracted)


def _verify_code(problem: Problem, response: str, equivalence: str, code_timeout: float) -> Verdict:
    code = _extract_code(response)
    # The prompt ends in a complete def (signature + docstring): a whole function redefines it, a bare
    # body continues it.
    whole = code.lstrip().startswith(("def ", "import ", "from ", "class "))
    program = problem.answer.replace("{completion}", "\n" + code if whole else code)
    result = run_python(program, timeout=code_timeout)
    return Verdict(1.0 if result.passed else -1.0, code[:200], f"{result.status}: {result.detail}")


# Problem.kind -> its verifier; `boxed` kinds count only a \boxed{} answer under boxed_only.
VERIFIERS: dict[str, Callable[[Problem, str, str, float], Verdict]] = {
    "math": _verify_math, "gsm8k": _verify_number, "choice": _verify_choice, "code": _verify_code}
assert tuple(VERIFIERS) == KINDS, "a problem kind without a verifier, or a verifier without a kind"
BOXED_ONLY_KINDS = ("gsm8k", "choice")


def verify(problem: Problem, response: str, *, equivalence: str = "math-verify", boxed_only: bool = False,
           code_timeout: float = 10.0) -> Verdict:
    if problem.kind not in VERIFIERS:
        raise ValueError(f"unknown problem kind {problem.kind!r}; verifiers exist for {tuple(VERIFIERS)}")
    if boxed_only and problem.kind in BOXED_ONLY_KINDS and last_boxed(response) is None:
        return Verdict(-1.0, None, "no \\boxed{} answer")
    return VERIFIERS[problem.kind](problem, response, equivalence, code_timeout)
