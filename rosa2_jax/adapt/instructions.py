"""What makes a Words message an instruction: answer-agnostic checks on a candidate, the error categories a
critique names and their fixed instructions, and where an attempt departs from a worked solution.

Every check here runs without the ground truth (the leakage guard, `leakage.py`, is the one that sees it):
a candidate is cleaned (`clean_instruction`), then `instruction_problems` lists what is wrong with it, by
name, so that a retry can be told what to fix and the records say why a candidate was refused.
"""

from __future__ import annotations

import difflib
import re
from typing import Sequence

from rosa2_jax.adapt.leakage import is_count, is_label, same_value
from rosa2_jax.tasks.answers import number_mentions, numeric_value

MAX_SENTENCES = 3
MAX_WORDS = 60
CATEGORIES = {  # a critique's error category -> the fixed instruction that carries its direction
    "misread condition": "Re-read every condition in the problem and make sure your solution uses each one "
                         "exactly as it is stated.",
    "wrong operation": "Look again at each operation you chose: for every step, decide from the problem whether "
                       "the quantities should be added, subtracted, multiplied or divided.",
    "arithmetic slip": "Redo each calculation in your solution slowly, one step at a time, and check every result.",
    "units": "Check the unit of every quantity, and convert them to the same unit before you combine them.",
    "missed step": "Check whether your solution leaves out a quantity or a step that the question needs.",
}
_CATEGORY_WORDS = [  # first match wins: the critique's "Mistake:" line is read before its other lines
    ("misread condition", r"misread|misunderst|condition|misinterpret"),
    ("wrong operation", r"operation|should (have )?(been )?(add|subtract|multipl|divid)|instead of"),
    ("units", r"\bunits?\b|convert|conversion"),
    ("arithmetic slip", r"arithmetic|calculation|computation|slip|miscalculat|computed wrong"),
    ("missed step", r"miss|forgot|omit|leaves? out|left out|skip|case"),
]
_ACTION = re.compile(
    r"\b(re-?read|re-?check|check|re-?compute|compute|re-?calculate|calculate|redo|re-?do|verify|compare|find|count|"
    r"add|subtract|multiply|divide|convert|look|consider|reconsider|make sure|ensure|use|include|read|work (it )?out|"
    r"figure out|determine|notice|note|remember|account for|think about|review|re-?examine|examine|identify|list|"
    r"write|set up|focus|pay attention|start|go back|try|solve|decide|separate|keep track|track)\b", re.I)
_ANSWER_STATEMENT = re.compile(
    r"\b(the|your|final|correct|right) (final |correct |right )?answer (is|should|must|would|will)\b|\banswer\s*:"
    r"|=\s*[-$\\]?\d|\b(should|must|would|will) (be|equal|get|give|come to|total)\s+(about |exactly )?[-$\\]?\d"
    r"|\byou (should|will|would) (get|obtain|find|end up with)\s+[-$\\]?\d|\bthe result is\s+[-$\\]?\d", re.I)
_PROMPT_WORDS = re.compile(  # the writer's own prompt coming back ("Your last instruction was refused ...")
    r"\b(refused|teacher's notes|answer key|(next|new|tutor's|last) instruction|write a different|to the student)\b",
    re.I)
_FILLED_BOX = re.compile(r"\\boxed\{\s*[^}\s]")
_LABEL = re.compile(r"^\s*(\*\*)?(next |the tutor'?s? )?(instruction|tutor|hint|feedback|message|answer)(\*\*)?\s*:\s*",
                    re.I)
_VERDICT_SENTENCE = re.compile(r"^(your|the) (previous |last )?(answer|solution) (is|was) (incorrect|wrong)\W*$", re.I)
_REQUEST_SENTENCE = re.compile(r"\\boxed|final answer within|step[- ]by[- ]step solution", re.I)


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z(\"'])", text.strip()) if s.strip()]


def clean_instruction(text: str) -> str:
    """A candidate as the model wrote it, without what code adds anyway: a label ("Instruction:"), quotes, a
    sentence restating the verdict or asking for the boxed answer; at most MAX_SENTENCES sentences."""
    text = text.strip().split("\n\n")[0].strip()
    text = _LABEL.sub("", text).strip().strip("\"'“”").strip()
    keep = [s for s in split_sentences(text) if not _VERDICT_SENTENCE.match(s) and not _REQUEST_SENTENCE.search(s)]
    return " ".join(keep[:MAX_SENTENCES]).strip()


def _values(text: str) -> list[float]:
    return [v for v, _, _ in number_mentions(text)]


def is_counted(text: str, start: int, end: int) -> bool:
    """A number that names a part of the work or counts things ("step 2", "both", "the two cases"), or the
    word "one" ("each one"): no value of the problem's."""
    return is_label(text, start, end) or is_count(text, start, end) or text[start:end].lower() == "one"


def _shares_run(a: str, b: str, words: int = 6) -> bool:
    """Do `a` and `b` share a run of `words` words?"""
    def runs(text):
        w = re.findall(r"[a-z0-9']+", text.lower())
        return {tuple(w[i: i + words]) for i in range(len(w) - words + 1)}
    return bool(runs(a) & runs(b))


def instruction_problems(text: str, problem: str, failed: str | None, examples: Sequence[str] = ()) -> list[str]:
    """Why a cleaned candidate cannot be the corrective part of the next message; [] when it can. `examples`: the
    worked examples' instructions, which a candidate must not copy."""
    if not text:
        return ["empty"]
    reasons = []
    if len(re.findall(r"[A-Za-z]{3,}", text)) < 4:
        reasons.append("bare")
    if len(text.split()) > MAX_WORDS:
        reasons.append("too long")
    if _FILLED_BOX.search(text):
        reasons.append("filled box")
    if _ANSWER_STATEMENT.search(text):
        reasons.append("answer statement")
    given = _values(problem)
    failed_value = numeric_value(failed) if failed else None
    mentions = [(v, s, e) for v, s, e in number_mentions(text) if not is_counted(text, s, e)]
    if failed_value is not None and any(same_value(v, failed_value) for v, _, _ in mentions):
        reasons.append("failed answer")
    elif failed and failed_value is None and failed.strip() and failed.strip() in text:
        reasons.append("failed answer")
    if any(not any(same_value(v, g) for g in given) for v, _, _ in mentions):
        reasons.append("new number")
    if text.lower() in problem.lower() or difflib.SequenceMatcher(None, text.lower(), problem.lower()).ratio() > 0.6:
        reasons.append("copy of problem")
    if any(_shares_run(text, e) for e in examples):
        reasons.append("copy of example")
    if _PROMPT_WORDS.search(text):
        reasons.append("echoes the prompt")
    if not _ACTION.search(text):
        reasons.append("no action")
    return reasons


def system_prompt_problems(text: str, failed: str | None) -> list[str]:
    """The textgrad baseline's checks on a candidate system prompt: it keeps the step-by-step and box
    instructions and carries no number at all (a number in a system prompt is an answer in waiting)."""
    if not text:
        return ["empty"]
    reasons = []
    if len(re.findall(r"[A-Za-z]{3,}", text)) < 4:
        reasons.append("bare")
    if len(text.split()) > 150:
        reasons.append("too long")
    if not re.search(r"step[- ]by[- ]step", text, re.I):
        reasons.append("drops step-by-step")
    if "\\boxed{}" not in text.replace(" ", ""):
        reasons.append("drops the box instruction")
    if _FILLED_BOX.search(text):
        reasons.append("filled box")
    if _ANSWER_STATEMENT.search(text):
        reasons.append("answer statement")
    if re.search(r"\d", text):
        reasons.append("number")
    return reasons


def critique_category(critique: str | None) -> str | None:
    """The error category a critique names (a key of CATEGORIES), its "Mistake:" line first; None if none."""
    if not critique:
        return None
    m = re.search(r"mistake\s*:\s*(.*)", critique, flags=re.I)
    for text in ([m.group(1)] if m else []) + [critique]:
        for category, words in _CATEGORY_WORDS:
            if re.search(words, text, flags=re.I):
                return category
    return None


def mask_value(text: str, value: str | None, mask: str = "[the wrong answer]") -> str:
    """`text` with every mention of the number `value` replaced by `mask` (what the instruction writer sees of
    the failed answer)."""
    target = numeric_value(value) if value else None
    if target is None:
        return text.replace(value, mask) if value and len(value.strip()) > 1 else text
    out, last = [], 0
    for v, start, end in number_mentions(text):
        if same_value(v, target):
            out += [text[last:start], mask]
            last = end
    return "".join(out + [text[last:]])


_STEP = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


def departure_step(solution: str, attempt: str, problem: str = "") -> str | None:
    """The first step of a worked solution whose result the attempt never states, as a sentence with that result
    hidden ("She sold 48/2 = [?] clips in May."); None when the solution marks no results (GSM8K marks each one
    as <<48/2=24>>24) or the attempt states all of them. A result equal to a number of the problem counts as
    stated only where the attempt computes it ("= 5"), not where it quotes the problem."""
    mentions = number_mentions(attempt)
    stated = [v for v, _, _ in mentions]
    computed = [v for v, start, _ in mentions if re.search(r"=\s*\$?\s*$", attempt[max(0, start - 4): start])]
    given = _values(problem)
    for line in solution.split("####")[0].splitlines():
        for m in _STEP.finditer(line):
            value = numeric_value(m.group(2))
            quoted = any(same_value(value, g) for g in given) if value is not None else False
            if value is None or any(same_value(value, v) for v in (computed if quoted else stated)):
                continue
            before, after = line[: m.start()], line[m.end():]
            shown = re.match(r"\s*[-\d.,/]+", after)
            after = after[shown.end():] if shown else after
            before = re.split(r"(?<=[.!?])\s+", before)[-1]  # the sentence that holds the step
            after = re.split(r"(?<=[.!?])\s+", after)[0]
            return re.sub(r"<<[^<>]*>>", "", f"{before}[?]{after}").strip()
    return None
