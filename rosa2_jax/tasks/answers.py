"""Final answers in text: `\\boxed{}` extraction, the Hendrycks-MATH string normalisation (the rule-based
reward of ROSA2 App. C.4), and numeric readings of answers (digits, fractions, radicals, number words).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

# How an answer is asked for in a message (the Words step appends it to every rewrite); `last_boxed` reads it.
BOXED_INSTRUCTION = "Put your final answer within \\boxed{}."


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces matched; None when there is none."""
    starts = [m.start() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        m = list(re.finditer(r"\\boxed (\S+)", text))  # "\boxed 5"
        return m[-1].group(1).rstrip("$.") if m else None
    i = text.index("{", starts[-1])
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1: j]
    return None


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        a, rest = part[0], part[1:]
        if rest.startswith("{"):
            out += "{" + a + "}" + rest
        else:
            out += "{" + a + "}{" + rest[0] + "}" + rest[1:]
    return out


def _slash_to_frac(s: str) -> str:
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def normalize_answer(s: str) -> str:
    """Hendrycks-MATH `strip_string`: the canonical form two equivalent answers share."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\text\{\s*[^}]*\}\s*$", lambda m: "" if s.strip() != m.group(0).strip() else m.group(0), s)  # units
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if "=" in s and len(s.split("=")[0].strip()) <= 2:  # "x = 5" -> "5"
        s = s.split("=", 1)[1]
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _slash_to_frac(s)


def answers_equal(a: str, b: str) -> bool:
    """String equivalence after normalisation (the paper's rule-based check)."""
    try:
        return normalize_answer(a) == normalize_answer(b)
    except Exception:  # a malformed answer is simply not equal
        return a == b


_UNITS = ("cm", "mm", "km", "m", "kg", "g", "mg", "lb", "lbs", "oz", "ft", "feet", "in", "inches", "miles", "mph",
          "hours", "hour", "minutes", "minute", "seconds", "second", "days", "day", "weeks", "years", "dollars",
          "dollar", "cents", "degrees", "units", "square", "sq", "meters", "liters", "l", "ml", "percent")
_ONES = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                      "fourteen fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i >= 2}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9}
_NUMBER_WORD = "|".join(sorted([*_ONES, *_TENS, *_SCALES, "and", "half", "halves", "third", "thirds", "quarter",
                                "quarters"], key=len, reverse=True))


def words_to_number(phrase: str) -> Fraction | None:
    """'twenty-five' -> 25, 'three hundred and two' -> 302, 'one half' -> 1/2, 'two thirds' -> 2/3."""
    words = [w for w in re.split(r"[\s-]+", phrase.lower().strip()) if w and w != "and"]
    if not words:
        return None
    denominators = {"half": 2, "halves": 2, "third": 3, "thirds": 3, "quarter": 4, "quarters": 4}
    if words[-1] in denominators:
        numerator = words_to_number(" ".join(words[:-1])) if len(words) > 1 else Fraction(1)
        return None if numerator is None else numerator / denominators[words[-1]]
    total, current = 0, 0
    for w in words:
        if w in _ONES:
            current += _ONES[w]
        elif w in _TENS:
            current += _TENS[w]
        elif w == "hundred":
            current = max(current, 1) * 100
        elif w in _SCALES:
            total += max(current, 1) * _SCALES[w]
            current = 0
        else:
            return None
    return Fraction(total + current)


def _to_value(token: str) -> float | None:
    token = token.replace(",", "")
    try:
        return float(Fraction(token))
    except (ValueError, ZeroDivisionError):
        return None


def numeric_value(answer: str) -> float | None:
    """The number an answer denotes (12, -3.5, 1,000, \\frac{3}{4}, 3/4, 2\\sqrt{3}, 2 sqrt(3), 50%, $12, 'twelve'),
    or None."""
    s = answer.strip()
    inner = last_boxed(s)
    if inner is not None:
        s = inner
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s).replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\left", "").replace("\\right", "")
    s = re.sub(r"\^\{?\\circ\}?", "", s).strip().rstrip(".")
    s = re.sub(r"\s*(" + "|".join(_UNITS) + r")\.?$", "", s, flags=re.I).strip()
    if "=" in s and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=", 1)[1].strip()
    m = re.fullmatch(r"(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", s)
    if m:
        num, den = _to_value(m.group(2)), _to_value(m.group(3))
        return None if num is None or not den else (-1 if m.group(1) else 1) * num / den
    m = re.fullmatch(r"(-?\d*\.?\d*)\s*\*?\s*(?:\\sqrt|sqrt|√)\s*[{(]?(\d+(?:\.\d+)?)[})]?", s)
    if m:
        coef = m.group(1)
        c = -1.0 if coef == "-" else (float(coef) if coef not in ("", "-") else 1.0)
        return c * math.sqrt(float(m.group(2)))
    value = _to_value(s)
    if value is not None:
        return value
    if re.fullmatch(rf"(?:{_NUMBER_WORD})(?:[\s-]+(?:{_NUMBER_WORD}))*", s, flags=re.I):
        v = words_to_number(s)
        return None if v is None else float(v)
    return None


_NUMBER_MENTION = re.compile(
    r"(?P<frac>-?\\[dt]?frac\{[^{}]+\}\{[^{}]+\})"
    r"|(?P<sqrt>-?\d*\.?\d*\s*\*?\s*(?:\\sqrt|\bsqrt|√)\s*[{(]?\d+(?:\.\d+)?[})]?)"
    r"|(?P<slash>-?\d+(?:\.\d+)?\s*/\s*\d+(?:\.\d+)?)"
    r"|(?P<num>-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+)"
    rf"|(?P<words>\b(?:{_NUMBER_WORD})(?:[\s-]+(?:{_NUMBER_WORD}))*\b)",
    flags=re.I,
)


def number_mentions(text: str) -> list[tuple[float, int, int]]:
    """(value, start, end) of every number written in `text`, in any of the forms numeric_value reads."""
    found = []
    for m in _NUMBER_MENTION.finditer(text):
        raw = m.group(0).replace(" ", "") if not m.group("words") else m.group(0)
        v = numeric_value(raw)
        if v is not None:
            found.append((v, m.start(), m.end()))
    return found
