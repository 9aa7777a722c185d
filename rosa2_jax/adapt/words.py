"""The Words stream (spec 2.3, 3.4): a TextGrad-style step on the next user message.

Two batched text-model calls per refinement: a critic that only criticises (never rewrites, never
answers), then a rewriter that returns the improved message between <IMPROVED_VARIABLE> tags. The critic
never sees the ground truth; it is used only by the leakage guard on the way out.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Sequence

from rosa2_jax.adapt.leakage import leaks_answer
from rosa2_jax.adapt.text_models import Completion, TextModel
from rosa2_jax.tasks.answers import BOXED_INSTRUCTION

FEEDBACK_TEMPLATE = ("Your previous answer is incorrect. Please re-examine the problem and your reasoning, and give a "
                     "corrected solution. Put your final answer within \\boxed{}.")
MAX_WORDS = 120

CRITIC_SYSTEM = (
    "You evaluate a failed attempt at a problem inside a tutoring loop. A verifier has already judged the final "
    "answer wrong. List the concrete, checkable reasons the attempt is probably wrong: the misread condition, the "
    "arithmetic or algebra slip and the step where it happens, unjustified assumptions, a missed case. Also list "
    "what to double-check next. Do not solve the problem. Do not state or guess the correct final answer. "
    "Be brief: at most 8 bullet points.")
REWRITER_SYSTEM = (
    "You are part of an optimisation system that improves a text variable. You improve the {role_short} using the "
    "critique of a failed attempt. Keep what is correct in the current value. Output only the improved variable "
    "between <IMPROVED_VARIABLE> and </IMPROVED_VARIABLE>.")
FEEDBACK_ROLE = "the user's follow-up instruction for the next attempt"
SYSTEM_PROMPT_ROLE = "the system prompt that instructs the assistant for its next attempt"
CONSTRAINTS = (
    "1. Must not reveal or suggest a specific final answer.\n"
    "2. Must ask for a fresh step-by-step solution with the final answer in \\boxed{{}}.\n"
    "3. At most {max_words} words.\n"
    "4. Write in the same language as the problem.")


@dataclasses.dataclass(frozen=True)
class RefineRequest:
    problem: str  # x_1
    attempt: str  # the failed response y_t
    extracted_answer: str | None  # what the verifier read from the attempt
    current: str | None  # raw x_{t+1} (None or "" = no user feedback), or the current system prompt
    previous_feedback: str | None = None  # x*_t
    ground_truth: str | None = None  # for the leakage guard only; never sent to the text model


@dataclasses.dataclass(frozen=True)
class RefineResult:
    message: str  # x*_{t+1} (or the new system prompt)
    status: str  # refined | fallback:error | fallback:untagged | fallback:empty | fallback:leak
    critique: str | None
    semantic_shift: float  # ||Δx|| proxy: normalised edit distance between current and refined text


def semantic_shift(before: str, after: str) -> float:
    """Labelled proxy for ||Δx|| (spec 2.5): 1 - difflib similarity ratio, in [0, 1]."""
    return 1.0 - difflib.SequenceMatcher(None, before, after).ratio()


def _middle_truncate(text: str, limit: int = 3000) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return text[:half] + "\n[...]\n" + text[-half:]


def _critic_prompt(r: RefineRequest) -> list[dict]:
    answer = r.extracted_answer if r.extracted_answer else "none (no \\boxed{} answer found)"
    user = (f"<PROBLEM>{r.problem}</PROBLEM>\n<PREVIOUS_FEEDBACK>{r.previous_feedback or '(none)'}</PREVIOUS_FEEDBACK>\n"
            f"<ATTEMPT>{_middle_truncate(r.attempt)}</ATTEMPT>\n"
            f"<EVALUATION>Final answer \"{answer}\" was judged incorrect.</EVALUATION>")
    return [{"role": "system", "content": CRITIC_SYSTEM}, {"role": "user", "content": user}]


def _rewriter_prompt(r: RefineRequest, critique: str, role: str, max_words: int) -> list[dict]:
    current = r.current if r.current else "(empty: no user feedback)"
    user = (f"<ROLE>{role}</ROLE>\n<VARIABLE>{current}</VARIABLE>\n<CONTEXT>\n<PROBLEM>{r.problem}</PROBLEM>\n"
            f"<ATTEMPT_SUMMARY>{_middle_truncate(r.attempt, 800)}</ATTEMPT_SUMMARY>\n<CRITIQUE>{critique}</CRITIQUE>\n"
            f"</CONTEXT>\n<CONSTRAINTS>\n{CONSTRAINTS.format(max_words=max_words)}\n</CONSTRAINTS>\n"
            "Improve the variable using the critique. Send only the improved variable between "
            "<IMPROVED_VARIABLE> and </IMPROVED_VARIABLE>.")
    system = REWRITER_SYSTEM.format(role_short=role)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_improved(text: str) -> str | None:
    """The text between <IMPROVED_VARIABLE> tags (a missing closing tag is tolerated); None if untagged."""
    m = re.search(r"<IMPROVED_VARIABLE>(.*?)(?:</IMPROVED_VARIABLE>|$)", text, flags=re.S)
    return m.group(1).strip() if m else None


def enforce_constraints(message: str, max_words: int = MAX_WORDS) -> str:
    words = message.split()
    if len(words) > max_words:
        message = " ".join(words[:max_words]).rstrip(",;:") + " ..."
    if "\\boxed" not in message:
        message = f"{message} {BOXED_INSTRUCTION}"
    return message


def _tgd_step(text_model: TextModel, requests: Sequence[RefineRequest], *, role: str, fallback: str,
              max_words: int, critic_tokens: int, rewrite_tokens: int, temperature: float) -> list[RefineResult]:
    if not requests:
        return []
    critiques = text_model.complete([_critic_prompt(r) for r in requests], max_tokens=critic_tokens,
                                    temperature=temperature)
    critique_text = [c.text if c.text else "(no critique available)" for c in critiques]
    rewrites = text_model.complete([_rewriter_prompt(r, c, role, max_words) for r, c in zip(requests, critique_text)],
                                   max_tokens=rewrite_tokens, temperature=temperature)
    return [_finish(r, c, w, fallback, max_words) for r, c, w in zip(requests, critiques, rewrites)]


def _finish(r: RefineRequest, critique: Completion, rewrite: Completion, fallback: str, max_words: int) -> RefineResult:
    current = r.current or ""
    default = current if current else fallback

    def result(message: str, status: str) -> RefineResult:
        return RefineResult(message, status, critique.text, semantic_shift(current, message))

    if rewrite.text is None:
        return result(default, "fallback:error")
    improved = parse_improved(rewrite.text)
    if improved is None:
        return result(default, "fallback:untagged")
    if not improved:
        return result(default, "fallback:empty")
    message = enforce_constraints(improved, max_words)
    if r.ground_truth is not None and leaks_answer(message, r.ground_truth, r.problem):
        return result(default, "fallback:leak")
    return result(message, "refined")


def refine_feedback(text_model: TextModel, requests: Sequence[RefineRequest], *, critic_tokens: int = 512,
                    rewrite_tokens: int = 256, temperature: float = 0.0) -> list[RefineResult]:
    """ROSA2 Step A for every failing session, as two batched calls. Every request gets a message."""
    return _tgd_step(text_model, requests, role=FEEDBACK_ROLE, fallback=FEEDBACK_TEMPLATE, max_words=MAX_WORDS,
                     critic_tokens=critic_tokens, rewrite_tokens=rewrite_tokens, temperature=temperature)


def refine_system_prompt(text_model: TextModel, requests: Sequence[RefineRequest], *, critic_tokens: int = 512,
                         rewrite_tokens: int = 256, temperature: float = 0.0) -> list[RefineResult]:
    """The TextGrad baseline (spec 2.3, last note): optimise the system prompt, weights frozen.

    `request.current` is the current system prompt; the fallback keeps it unchanged.
    """
    return _tgd_step(text_model, requests, role=SYSTEM_PROMPT_ROLE, fallback="", max_words=150,
                     critic_tokens=critic_tokens, rewrite_tokens=rewrite_tokens, temperature=temperature)
