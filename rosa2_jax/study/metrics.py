"""Sweep metrics (spec 4.2): accuracy within K, correction uplift (both definitions), average turns with
unsolved problems counted as K, accuracy per turn, time per problem; 95% Wilson intervals, and paired
comparisons of methods on the problems both ran (`compare_methods`). Beside them, what the adaptation did
to the model's behaviour (`_behaviour`): whether later turns copy the previous answer, whether a Weights
step lowered the failed answer's probability, and (`adapt/quality.py`) whether the Words messages are instructions.

Records are `tasks.records.ProblemRecord`s, or the JSON rows of records.jsonl they are read from.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from rosa2_jax.adapt.quality import WordsStep, words_quality
from rosa2_jax.tasks.records import ProblemRecord
from rosa2_jax.study.stats import paired_comparison, wilson_interval

Record = ProblemRecord | dict
# Failed-answer lengths in tokens, [low, high), for splitting the Weights steps: a step's window is its
# failed answer, so methods whose answers differ in length are compared within a length.
ANSWER_LENGTHS = ((0, 32), (32, 100), (100, None))


def as_records(records: Iterable[Record]) -> list[ProblemRecord]:
    return [r if isinstance(r, ProblemRecord) else ProblemRecord.from_json(r) for r in records]


def summarize_method(records: Iterable[Record], max_turns: int, questions: dict[str, str] | None = None) -> dict:
    """`questions` (problem id -> problem text), where given, lets the Words quality count new numbers."""
    records = as_records(records)
    n = len(records)
    solved_at = [r.solved_at for r in records]
    solved = [t for t in solved_at if t is not None]
    late = [t for t in solved if t >= 2]
    failed_first = [t for t in solved_at if t != 1]
    by_turn = [sum(t is not None and t <= k for t in solved_at) for k in range(1, max_turns + 1)]
    return {
        "problems": n,
        "accuracy": len(solved) / n if n else 0.0,
        "accuracy_ci95": list(wilson_interval(len(solved), n)),
        "turn1_accuracy": sum(t == 1 for t in solved) / n if n else 0.0,
        # Table 2 caption: share of the solved problems that needed more than one turn.
        "correction_uplift": len(late) / len(solved) if solved else 0.0,
        # App. C.3 Eq. 19: share of the turn-1 failures solved later.
        "correction_uplift_appc": len(late) / len(failed_first) if failed_first else 0.0,
        "avg_turns": sum(t if t is not None else max_turns for t in solved_at) / n if n else 0.0,
        "accuracy_by_turn": [k / n if n else 0.0 for k in by_turn],
        "accuracy_by_turn_ci95": [list(wilson_interval(k, n)) for k in by_turn],
        "seconds_per_problem": sum(r.seconds for r in records) / n if n else 0.0,
        "mean_step_norm_sq_by_turn": _mean_by_turn(records, max_turns, "step_norm_sq"),
        "mean_applied_step_norm_sq_by_turn": _mean_by_turn(records, max_turns, "step_norm_sq", _step_kept),
        "later_applied_step_norm_sq_by_answer_tokens": _later_steps_by_answer_length(records),
        **_weights_step_counts(records),
        **_words_fallback_counts(records),
        "words_quality": words_quality(WordsStep(t.refine, t.extracted, r.answer, (questions or {}).get(r.problem_id),
                                                 t.response_tokens)
                                       for r in records for t in r.turns if t.refine is not None),
        "mean_semantic_shift_by_turn": _mean_by_turn(records, max_turns, "semantic_shift"),
        "mean_response_tokens_by_turn": _mean_by_turn(records, max_turns, "response_tokens"),
        **_behaviour(records),
    }


def _mean(values: list[float] | list[bool]) -> float | None:
    """The mean, or None with nothing to count; of flags, the share that hold."""
    return sum(values) / len(values) if values else None


def _behaviour(records: list[ProblemRecord]) -> dict:
    """Per method, from the turns alone:
    - answer_kept_rate: of the turns after the first, the share whose extracted answer equals the previous
      turn's (a session copying its own failed answer; turns without an answer on either side not counted);
    - response_repeated_rate: the share whose response is the previous turn's, word for word;
    - mean_response_tokens_first / _later: the answers' length in tokens at turn 1 and at later turns (a
      Weights step's window is its failed answer, so a method whose later answers are short takes steps on
      a few tokens);
    - later_unanswered_rate: of the turns after the first, the share with no answer to extract (no box under
      the boxed-only rule): wrong whatever the model meant;
    - failed_logp_drop: mean over Weights steps of the drop of the failed response's mean token log-prob
      (logp_before - logp_after; > 0: the step made the failed answer less likely);
    - mean_step_norm_sq: ||Δθ||² over every Weights step (paper Theorem 4.1: lower for ROSA2 than ROSA), a step
      the KL safeguard refused counting as 0 (the adapter did not move); mean_applied_step_norm_sq: over the
      steps it kept, so that a method refusing more steps does not look smaller for it."""
    kept, repeated, drops, norms, applied = [], [], [], [], []
    first_tokens, later_tokens, unanswered = [], [], []
    for r in records:
        for before, after in zip(r.turns, r.turns[1:]):
            if before.extracted is not None and after.extracted is not None:
                kept.append(before.extracted == after.extracted)
            repeated.append(before.response == after.response)
            unanswered.append(after.extracted is None)
        for t in r.turns:
            (first_tokens if t.turn == 1 else later_tokens).append(t.response_tokens)
            if t.update is not None and "logp_before" in t.update:
                drops.append(t.update["logp_before"] - t.update["logp_after"])
            if t.step_norm_sq is not None:
                norms.append(t.step_norm_sq)
                if _step_kept(t):
                    applied.append(t.step_norm_sq)
    return {"answer_kept_rate": _mean(kept), "response_repeated_rate": _mean(repeated),
            "mean_response_tokens_first": _mean(first_tokens), "mean_response_tokens_later": _mean(later_tokens),
            "later_unanswered_rate": _mean(unanswered), "failed_logp_drop": _mean(drops),
            "mean_step_norm_sq": _mean(norms), "mean_applied_step_norm_sq": _mean(applied)}


def _weights_step_counts(records: list[ProblemRecord]) -> dict:
    """How many Weights steps ran, and how many the KL safeguard shortened (backtracked) or refused."""
    updates = [t.update for r in records for t in r.turns if t.update is not None]
    return {"weights_steps": len(updates),
            "weights_steps_backtracked": sum(u.get("backtracks", 0) > 0 for u in updates),
            "weights_steps_rejected": sum(bool(u.get("rejected")) for u in updates)}


def _words_fallback_counts(records: list[ProblemRecord]) -> dict:
    """How often a Words step fell back to the raw feedback instead of its rewrite, in all and for leaks."""
    statuses = [t.refine["status"] for r in records for t in r.turns if t.refine is not None]
    fallbacks = [s for s in statuses if s.startswith("fallback")]
    return {"words_steps": len(statuses),
            "words_fallback_rate": len(fallbacks) / len(statuses) if statuses else 0.0,
            "words_leak_fallback_rate": fallbacks.count("fallback:leak") / len(statuses) if statuses else 0.0}


def _later_steps_by_answer_length(records: list[ProblemRecord]) -> dict[str, dict]:
    """The Weights steps after turns 2..K (turn 1's step is the same for every Weights method: the same
    first answer), by the failed answer's length (ANSWER_LENGTHS): mean ||Δθ||² and number of the kept
    steps, and the number the KL safeguard refused."""
    split = {}
    for low, high in ANSWER_LENGTHS:
        steps = [t for r in records for t in r.turns
                 if t.turn > 1 and t.step_norm_sq is not None
                 and low <= t.response_tokens and (high is None or t.response_tokens < high)]
        norms = [t.step_norm_sq for t in steps if _step_kept(t)]
        split[f"{low}-{high - 1}" if high else f"{low}+"] = {"mean": _mean(norms), "steps": len(norms),
                                                             "refused": len(steps) - len(norms)}
    return split


def _step_kept(turn) -> bool:
    """The turn's Weights step, if any, was not refused by the KL safeguard."""
    return not (turn.update or {}).get("rejected")


def _mean_by_turn(records: list[ProblemRecord], max_turns: int, key: str, counts_turn=lambda turn: True
                  ) -> list[float | None]:
    """Per turn, the mean of `key` over the turns that have it and that `counts_turn` accepts."""
    sums, counts = defaultdict(float), defaultdict(int)
    for r in records:
        for turn in r.turns:
            value = getattr(turn, key)
            if value is not None and counts_turn(turn):
                sums[turn.turn] += value
                counts[turn.turn] += 1
    return [sums[t] / counts[t] if counts[t] else None for t in range(1, max_turns + 1)]


def summarize(records: Iterable[Record], max_turns: int, questions: dict[str, str] | None = None) -> dict[str, dict]:
    by_method: dict[str, list[ProblemRecord]] = defaultdict(list)
    for r in as_records(records):
        by_method[r.method].append(r)
    return {m: summarize_method(rs, max_turns, questions) for m, rs in sorted(by_method.items())}


# (method a, method b): every method against the baseline, ROSA2 against each single axis, and CONTROL_PAIRS.
# The Weights step against K fresh attempts (does it do more than break the habit of repeating an answer?), and
# each reference-aware arm against its self-critic twin.
CONTROL_PAIRS = (("rosa", "resample"), ("words", "resample"), ("words-ref", "words"), ("rosa2-ref", "rosa2"),
                 ("rosa2-ref", "rosa"))


def comparison_pairs(methods: Iterable[str]) -> list[tuple[str, str]]:
    methods = sorted(methods)
    pairs = [(m, "baseline") for m in methods if m != "baseline" and "baseline" in methods]
    pairs += [("rosa2", m) for m in ("words", "rosa") if "rosa2" in methods and m in methods]
    return pairs + [(a, b) for a, b in CONTROL_PAIRS if a in methods and b in methods]


def compare_methods(records: Iterable[Record]) -> list[dict]:
    """Paired differences of accuracy within K (a - b) on the problems both methods ran, with a
    paired-bootstrap 95% interval, the exact McNemar p-value and the problems only one of them solved; and on how
    many of them the two first answers are the same text. Every method's first turn has the same prompt and seed,
    so where they differ the pair's first turns are two draws, not one (e.g. bfloat16 decoding that depended on a
    row's batch-mates: BUILD_NOTES, "Batch-mates")."""
    solved: dict[str, dict[str, bool]] = defaultdict(dict)
    first: dict[str, dict[str, str | None]] = defaultdict(dict)
    for r in as_records(records):
        solved[r.method][r.problem_id] = r.solved_at is not None
        first[r.method][r.problem_id] = r.turns[0].response if r.turns else None
    return [{"a": a, "b": b, **paired_comparison(solved[a], solved[b]),
             "same_first_answer": sum(first[a][p] is not None and first[a][p] == first[b][p]
                                      for p in set(first[a]) & set(first[b]))}
            for a, b in comparison_pairs(solved)]
