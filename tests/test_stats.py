"""Paired statistics against hand-computed values and a coverage simulation."""

import numpy as np
import pytest

from experiments.wins import hand_checks, render, wins
from rosa2_jax.study.metrics import compare_methods
from rosa2_jax.tasks.problem import Problem
from rosa2_jax.study.stats import mcnemar_exact, paired_bootstrap, wilson_interval


def test_mcnemar_exact_by_hand():
    # 1 vs 6 discordant pairs: 2 * (C(7,0) + C(7,1)) / 2^7 = 16 / 128
    assert mcnemar_exact(1, 6) == pytest.approx(0.125)
    assert mcnemar_exact(6, 1) == pytest.approx(0.125)
    # 2 vs 10: 2 * (1 + 12 + 66) / 4096
    assert mcnemar_exact(2, 10) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_paired_bootstrap_covers_the_true_difference_at_the_nominal_rate():
    """Correlated paired successes with P(a) = 0.55, P(b) = 0.40: the 95% interval should cover the
    true difference 0.15 in about 95% of 400 synthetic studies of 150 problems."""
    rng = np.random.default_rng(0)
    # joint distribution of (a, b): both 0.35, only a 0.20, only b 0.05, neither 0.40
    outcomes = np.array([[1, 1], [1, 0], [0, 1], [0, 0]])
    probs = [0.35, 0.20, 0.05, 0.40]
    covered = 0
    for i in range(400):
        pairs = outcomes[rng.choice(4, size=150, p=probs)]
        _, lo, hi = paired_bootstrap(pairs[:, 0], pairs[:, 1], resamples=2000, seed=i)
        covered += lo <= 0.15 <= hi
    assert 0.91 <= covered / 400 <= 0.98


def rec(method, pid, solved_at):
    return {"method": method, "problem_id": pid, "solved_at": solved_at}


RECORDS = ([rec("baseline", p, s) for p, s in [("p1", 1), ("p2", None), ("p3", None), ("p4", 2)]]
           + [rec("rosa2", p, s) for p, s in [("p1", 1), ("p2", 3), ("p3", 2), ("p5", 1)]]
           + [rec("rosa", p, s) for p, s in [("p1", None), ("p2", 2)]])


def test_compare_methods_pairs_problems_both_ran():
    records = RECORDS
    out = {(c["a"], c["b"]): c for c in compare_methods(records)}
    assert set(out) == {("rosa", "baseline"), ("rosa2", "baseline"), ("rosa2", "rosa")}
    c = out[("rosa2", "baseline")]
    assert c["problems"] == 3  # p1..p3; p4 and p5 ran under one method only
    assert (c["only_a"], c["only_b"]) == (2, 0) and c["difference"] == pytest.approx(2 / 3)
    assert c["mcnemar_p"] == pytest.approx(0.5)
    r = out[("rosa2", "rosa")]
    assert r["problems"] == 2 and (r["only_a"], r["only_b"]) == (1, 0)
    assert c["same_first_answer"] == r["same_first_answer"] == 0  # no turns recorded


def test_compare_methods_counts_the_problems_whose_first_answers_are_the_same_text():
    def turns(first):
        return [{"turn": t + 1, "user": "q", "system_prompt": None, "response": text, "extracted": None,
                 "reward": -1.0, "response_tokens": 3, "finish_reason": "stop", "prompt_tokens": 9}
                for t, text in enumerate([first, "later answers are not compared"])]

    records = [r | {"turns": turns(f"answer to {r['problem_id']}")} for r in RECORDS if r["method"] != "rosa"]
    records[4]["turns"] = turns("another draw")  # rosa2's p1
    records[6]["turns"] = []  # rosa2's p3: no turn (e.g. refused at admission)
    [c] = compare_methods(records)
    assert (c["a"], c["b"], c["problems"]) == ("rosa2", "baseline", 3)
    assert c["same_first_answer"] == 1  # p2 only


def test_wins_are_the_problems_only_the_method_solved_among_those_both_ran():
    turns = [{"user": "q3", "response": "first"}, {"user": "Try again, step by step.", "response": "so \\boxed{9}"}]
    records = [r | {"answer": "9", "turns": turns} for r in RECORDS]
    won = wins(records, "rosa2", "baseline")
    assert [r["problem_id"] for r in won] == ["p2", "p3"]  # p5: baseline did not run it
    assert wins(records, "baseline", "rosa2") == [] and [r["problem_id"] for r in wins(records, "rosa", "rosa2")] == []
    only = {(c["a"], c["b"]): c["only_a"] for c in compare_methods(RECORDS)}
    assert len(won) == only[("rosa2", "baseline")]
    text = render("rosa2", "baseline", won[1:], {"p3": Problem("p3", "q3", "9", "math", {"solution": "4 + 5 = 9"})})
    assert "### p3 (turn 2; reference 9)" in text and "4 + 5 = 9" in text and "Try again, step by step." in text
    assert text.count("Hand check:") == 1 and "so \\boxed{9}" in text


def test_filled_hand_checks_survive_a_new_rendering_and_are_counted():
    turns = [{"user": "q2", "response": "### p3 (a heading of the model's own)\nHand check: not one\n\\boxed{9}"}] * 3
    records = [r | {"answer": "9", "turns": turns} for r in RECORDS]
    won = wins(records, "rosa2", "baseline")
    first = render("rosa2", "baseline", won, {})
    assert "(hand checked: 0 right, 0 number only; 2 open)" in first and hand_checks(first) == {}
    filled = first.replace("Hand check: \n", "Hand check: number only: 3 x 3 read as 3 + 6\n", 1)
    checks = hand_checks("# Wins\n\n" + filled)
    assert checks == {("rosa2", "baseline", "p2"): "number only: 3 x 3 read as 3 + 6"}
    again = render("rosa2", "baseline", won, {}, checks)
    assert "(hand checked: 0 right, 1 number only; 1 open)" in again
    assert again.count("Hand check: number only: 3 x 3 read as 3 + 6") == 1
    assert render("rosa", "baseline", won, {}, checks).count("number only: 3 x 3") == 0  # another section's
