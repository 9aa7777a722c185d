"""Metrics on hand-computed cases and the Table 2 consistency; verifiers on known verdicts; the sandbox."""

import time

import pytest

from rosa2_jax.tasks.answers import BOXED_INSTRUCTION
from rosa2_jax.tasks.problem import Problem
from rosa2_jax.study.metrics import summarize, summarize_method
from rosa2_jax.tasks.records import ProblemRecord, TurnRecord
from rosa2_jax.tasks.rewards import math_equal, verify
from rosa2_jax.tasks.sandbox import run_python


def rec(solved_at, method="m", seconds=1.0):
    return {"method": method, "problem_id": "p", "solved_at": solved_at, "seconds": seconds, "turns": []}


def turn_record(**fields):
    """A failed turn's record as the engine writes it, with `fields` (update, refine, ...) added."""
    base = dict(turn=1, user="question", system_prompt="system", response="answer", extracted=None, reward=-1.0,
                response_tokens=5, finish_reason="stop", prompt_tokens=20)
    return TurnRecord(**(base | fields)).to_json()


def test_a_record_reads_back_as_written_and_early_rows_take_defaults():
    row = {"method": "rosa2", "dataset": "gsm8k", "problem_id": "p", "answer": "7", "solved_at": 2,
           "turns": [turn_record(update={"cg_iters": 4}, step_norm_sq=0.5), turn_record(turn=2, reward=1.0)],
           "seconds": 3.5, "error": None}
    assert ProblemRecord.from_json(row).to_json() == row and list(ProblemRecord.from_json(row).to_json()) == list(row)
    early = ProblemRecord.from_json({"method": "rosa", "problem_id": "q", "solved_at": None})
    assert (early.dataset, early.answer, early.turns, early.seconds, early.error) == ("", "", [], 0.0, None)


def test_metrics_on_a_hand_computed_case():
    records = [rec(1), rec(3), rec(None), rec(2), rec(None)]
    s = summarize_method(records, max_turns=4)
    assert s["accuracy"] == 3 / 5
    assert s["turn1_accuracy"] == 1 / 5
    assert s["correction_uplift"] == 2 / 3  # caption: solved later / solved
    assert s["correction_uplift_appc"] == 2 / 4  # App. C: solved later / failed at turn 1
    assert s["avg_turns"] == (1 + 3 + 4 + 2 + 4) / 5
    assert s["accuracy_by_turn"] == [1 / 5, 2 / 5, 3 / 5, 3 / 5]


def test_table2_consistency_math_baseline():
    """Qwen3-8B MATH baseline (Table 2): Acc 50.0, CU 70.0, Avg Turn 7.2 with K = 10 and unsolved = K.

    Caption CU implies a turn-1 accuracy of Acc x (1 - CU) = 15%; the late solves then average 5.86 turns.
    """
    late_turns = [5] * 50 + [6] * 300  # 350 late solves whose turns sum to 2050 (mean 5.857)
    records = [rec(1)] * 150 + [rec(t) for t in late_turns] + [rec(None)] * 500
    s = summarize_method(records, max_turns=10)
    assert s["accuracy"] == pytest.approx(0.500)
    assert s["correction_uplift"] == pytest.approx(0.700)
    assert s["turn1_accuracy"] == pytest.approx(0.500 * (1 - 0.700))
    assert s["avg_turns"] == pytest.approx(7.2)
    assert s["correction_uplift_appc"] == pytest.approx(350 / 850)
    # The App. C definition would need a negative turn-1 accuracy here: (Acc - CU) / (1 - CU) < 0.
    assert (0.5 - 0.7) / (1 - 0.7) < 0


def test_weights_step_counts():
    def turn(update=None):
        return turn_record(update=update)

    records = [rec(None) | {"turns": [turn({"backtracks": 0, "rejected": False}), turn({"backtracks": 2, "rejected": False}),
                                      turn()]},
               rec(None) | {"turns": [turn({"backtracks": 3, "rejected": True}), turn({"step_norm_sq": 0.1})]}]
    s = summarize_method(records, max_turns=3)
    assert (s["weights_steps"], s["weights_steps_backtracked"], s["weights_steps_rejected"]) == (4, 2, 1)


def test_words_fallback_rates():
    def turn(status):
        return turn_record(refine={"status": status, "message": "m", "critique": "c"})

    records = [rec(None) | {"turns": [turn("refined"), turn("fallback:leak"), turn_record(turn=3)]},
               rec(None) | {"turns": [turn("fallback:untagged"), turn("refined")]}]
    s = summarize_method(records, max_turns=3)
    assert s["words_steps"] == 4 and s["words_fallback_rate"] == 2 / 4 and s["words_leak_fallback_rate"] == 1 / 4
    assert summarize_method([rec(1)], max_turns=3)["words_fallback_rate"] == 0.0


def test_behaviour_counts_on_a_hand_built_session():
    """Copying, the failed answer's log-prob drop, ||Δθ||² and what the rewrites are, counted by hand."""
    def words(message):
        return {"status": "refined", "message": f"{message} {BOXED_INSTRUCTION}", "critique": "c"}

    turns = [turn_record(turn=1, response="x = 12, \\boxed{12}", extracted="12", refine=words("12"),
                         update={"logp_before": -1.0, "logp_after": -1.5}, step_norm_sq=0.2),
             turn_record(turn=2, response="x = 12, \\boxed{12}", extracted="12",
                         refine=words("Re-check the step where you add the 2 boxes, not 12.5"),
                         update={"logp_before": -0.8, "logp_after": -0.9}, step_norm_sq=0.4),
             turn_record(turn=3, response="so \\boxed{7}", extracted="7",
                         refine={"status": "fallback:leak", "message": "7", "critique": "c"},
                         update={"logp_before": -0.5, "logp_after": -0.5, "rejected": True}, step_norm_sq=0.0),
             turn_record(turn=4, response="no box", extracted=None, response_tokens=2)]
    s = summarize_method([rec(None) | {"turns": turns}], max_turns=4)
    assert s["answer_kept_rate"] == 1 / 2  # 12 -> 12 kept, 12 -> 7 not; 7 -> None not counted
    assert s["response_repeated_rate"] == 1 / 3
    assert s["mean_response_tokens_first"] == 5 and s["mean_response_tokens_later"] == (5 + 5 + 2) / 3
    assert s["mean_response_tokens_by_turn"] == [5, 5, 5, 2]
    assert s["later_unanswered_rate"] == 1 / 3  # turns 2 and 3 have an answer, turn 4 none
    assert s["failed_logp_drop"] == pytest.approx((0.5 + 0.1 + 0.0) / 3)
    # The refused step counts as 0 in the mean over all steps and not at all in the mean over kept ones.
    assert s["mean_step_norm_sq"] == pytest.approx((0.2 + 0.4 + 0.0) / 3)
    assert s["mean_applied_step_norm_sq"] == pytest.approx((0.2 + 0.4) / 2)
    assert s["mean_step_norm_sq_by_turn"] == [0.2, 0.4, 0.0, None]
    assert s["mean_applied_step_norm_sq_by_turn"] == [0.2, 0.4, None, None]
    # The Words messages (adapt/quality.py), all three: "12" and "7" are bare and state their turn's failed answer;
    # the instruction mentions 12.5 and 2, neither of which is the failed answer 12. None keeps the verdict or
    # carries a validated instruction (these records are of the earlier stream, which kept none).
    q = s["words_quality"]
    assert q["steps"] == 3 and q["bare"] == 2 / 3 and q["states_failed"] == 2 / 3
    assert q["instructive"] == 0 and q["verdict_kept"] == 0 and q["new_numbers"] is None  # no problem text given
    assert q["status"]["refined"] == 2 / 3 and q["status"]["fallback:leak"] == 1 / 3
    with_question = summarize_method([rec(None) | {"turns": turns}], 4, {"p": "Add 2 boxes of 12.5 kg."})
    assert with_question["words_quality"]["new_numbers"] == 2 / 3  # 12 and 7 are not in it
    empty = summarize_method([rec(1)], max_turns=4)
    assert empty["answer_kept_rate"] is None and empty["failed_logp_drop"] is None
    assert empty["mean_applied_step_norm_sq"] is None
    assert empty["mean_response_tokens_first"] is None and empty["later_unanswered_rate"] is None


def test_later_weights_steps_are_split_by_the_failed_answers_length():
    """Turn 1's step is left out, refused steps are counted apart; a step's answer length picks its bucket."""
    def step(turn, tokens, norm, rejected=False):
        return turn_record(turn=turn, response_tokens=tokens, step_norm_sq=norm,
                           update={"logp_before": 0.0, "logp_after": 0.0, "rejected": rejected})

    sessions = [[step(1, 300, 9.0), step(2, 7, 0.1), step(3, 31, 0.3), step(4, 32, 0.5), step(5, 3, 0.0, True)],
                [step(1, 8, 9.0), step(2, 100, 0.2), step(3, 400, 0.4), step(4, 150, 7.0, rejected=True)]]
    s = summarize_method([rec(None) | {"turns": turns} for turns in sessions], max_turns=5)
    split = s["later_applied_step_norm_sq_by_answer_tokens"]
    assert list(split) == ["0-31", "32-99", "100+"]
    assert split["0-31"] == {"mean": pytest.approx(0.2), "steps": 2, "refused": 1}
    assert split["32-99"] == {"mean": 0.5, "steps": 1, "refused": 0}
    assert split["100+"] == {"mean": pytest.approx(0.3), "steps": 2, "refused": 1}
    assert all(c == {"mean": None, "steps": 0, "refused": 0} for c in
               summarize_method([rec(1)], max_turns=5)["later_applied_step_norm_sq_by_answer_tokens"].values())


def test_summary_splits_methods():
    out = summarize([rec(1, "a"), rec(None, "b")], max_turns=2)
    assert out["a"]["accuracy"] == 1.0 and out["b"]["accuracy"] == 0.0


MATH_PAIRS = [  # (model answer, ground truth, equal?)
    ("\\frac{1}{2}", "\\frac12", True), ("0.5", "\\frac{1}{2}", True), ("\\dfrac{3}{4}", "\\frac{3}{4}", True),
    ("3/4", "\\frac{3}{4}", True), ("\\tfrac{2}{6}", "\\frac{1}{3}", True), ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True), ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", True),
    ("10\\%", "10", True), ("5 \\text{ cm}", "5", True), ("x = 7", "7", True), ("\\$12", "12", True),
    ("(1, 2)", "(1,2)", True), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
    ("[0, 1)", "[0,1)", True), ("(-\\infty, 2]", "(-\\infty,2]", True), ("x^2+2x+1", "(x+1)^2", True),
    ("120^\\circ", "120", True), ("1000", "1{,}000", True), ("\\text{Monday}", "\\text{Monday}", True),
    ("-3", "-3", True), ("\\pi", "\\pi", True), ("2\\pi", "2 \\pi", True), ("6", "6.0", True),
    ("\\frac{7}{2}", "3.5", True), ("4", "\\sqrt{16}", True), ("1/3", "0.3333", False),
    ("\\frac{1}{2}", "\\frac{1}{3}", False), ("2\\sqrt{3}", "3\\sqrt{2}", False), ("(1, 2)", "(2, 1)", False),
    ("[0, 1)", "[0, 1]", False), ("(-\\infty, 2)", "(-\\infty, 2]", False), ("5", "-5", False),
    ("\\text{Monday}", "\\text{Tuesday}", False), ("x^2+1", "(x+1)^2", False), ("12", "120", False),
    ("\\pi", "2\\pi", False), ("7", "x = 8", False), ("0", "", False), ("\\frac{3}{4}", "0.7", False),
    ("100", "10", False), ("e", "\\pi", False),
]


@pytest.mark.parametrize("answer,truth,equal", MATH_PAIRS)
def test_math_verifier_known_verdicts(answer, truth, equal):
    problem = Problem("p", "q", truth, "math")
    assert verify(problem, f"so the result is \\boxed{{{answer}}}.").reward == (1.0 if equal else -1.0)


def test_string_equivalence_is_the_papers_normalisation():
    assert math_equal("\\dfrac{1}{2}", "0.5", "string")  # both normalise to \frac{1}{2}
    assert not math_equal("x^2+2x+1", "(x+1)^2", "string")  # needs symbolic equivalence
    assert math_equal("x^2+2x+1", "(x+1)^2", "math-verify")


def test_no_box_is_wrong_and_last_box_counts():
    p = Problem("p", "q", "4", "math")
    assert verify(p, "The answer is 4.").reward == -1.0
    assert verify(p, "\\boxed{3} no wait \\boxed{4}").reward == 1.0


def test_gsm8k_and_choice_verifiers():
    g = Problem("g", "q", "18", "gsm8k")
    assert verify(g, "She makes $18 per day.").reward == 1.0
    assert verify(g, "So \\boxed{18.0} dollars").reward == 1.0
    assert verify(g, "So 1,800 cents, that is \\boxed{17}").reward == -1.0
    c = Problem("c", "q", "C", "choice")
    assert verify(c, "The answer is (C).").reward == 1.0
    assert verify(c, "\\boxed{\\text{(C)}}").reward == 1.0
    assert verify(c, "I pick (B)").reward == -1.0


def test_boxed_only_counts_no_answer_outside_a_box():
    """The paper's rule-based reward: no \\boxed{}, -1, even when the last number or letter is right
    (a cut-off answer whose last number is a correct intermediate result)."""
    g = Problem("g", "q", "18", "gsm8k")
    assert verify(g, "16 - 3 - 4 = 9 eggs, and 9 * 2 = 18", boxed_only=True).reward == -1.0
    assert verify(g, "16 - 3 - 4 = 9 eggs, and 9 * 2 = 18", boxed_only=False).reward == 1.0
    assert verify(g, "so \\boxed{18}", boxed_only=True).reward == 1.0
    c = Problem("c", "q", "C", "choice")
    assert verify(c, "The answer is (C).", boxed_only=True).reward == -1.0
    assert verify(c, "\\boxed{C}", boxed_only=True).reward == 1.0
    m = Problem("m", "q", "\\frac{1}{2}", "math")
    assert verify(m, "it is 1/2", boxed_only=False).reward == -1.0  # math needs a box either way


HUMANEVAL_ADD = Problem(
    "HumanEval/x", "q",
    'def add(a, b):\n    """Add two numbers."""\n{completion}\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n\n'
    "check(add)\n", "code", {"entry_point": "add", "prompt": 'def add(a, b):\n    """Add two numbers."""\n'})


def test_code_verifier_runs_unit_tests():
    assert verify(HUMANEVAL_ADD, "```python\ndef add(a, b):\n    return a + b\n```").reward == 1.0
    assert verify(HUMANEVAL_ADD, "```python\n    return a + b\n```").reward == 1.0
    assert verify(HUMANEVAL_ADD, "```python\ndef add(a, b):\n    return a - b\n```").reward == -1.0


@pytest.mark.parametrize("program,status", [
    ("while True:\n    pass\n", "timeout"),
    ("x = bytearray(4 * 1024 ** 3)\n", "failed"),
    ("import socket\nsocket.create_connection(('127.0.0.1', 80))\n", "failed"),
    ("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9')\n", "failed"),
])
def test_sandbox_stops_bad_programs(program, status):
    start = time.perf_counter()
    result = run_python(program, timeout=3.0, memory_mb=256, cpu_seconds=2)
    assert not result.passed and result.status == status, result
    assert time.perf_counter() - start < 10


def test_sandbox_runs_in_a_temporary_directory():
    assert run_python("import os\nassert os.getcwd().split('/')[-1].startswith('rosa2-sandbox-')\n").passed


def test_bad_code_scores_minus_one_and_the_next_runs():
    looping = verify(HUMANEVAL_ADD, "```python\ndef add(a, b):\n    while True: pass\n```", code_timeout=2.0)
    assert looping.reward == -1.0 and looping.detail.startswith("timeout")
    assert verify(HUMANEVAL_ADD, "```python\ndef add(a, b):\n    return b + a\n```").reward == 1.0
