"""The model-based reward: parsing the judge, and a sweep that acts on the judge while accuracy stays the rule's."""

import pytest

from conftest import tiny_chat_model
from rosa2_jax.adapt.text_models import Completion
from rosa2_jax.checkpoint import load_model
from rosa2_jax.engine import EngineConfig, TurnEngine
from rosa2_jax.model.generation import SamplingConfig
from rosa2_jax.tasks.problem import Problem
from rosa2_jax.adapt.judge import judge_prompt, judge_rewards, parse_judgement


@pytest.mark.parametrize("text,reward", [
    ("CORRECT", 1.0), ("Incorrect.", -1.0), ("The answer is correct", 1.0), ("INCORRECT - it should be 5", -1.0),
    ("incorrectly formatted but CORRECT", 1.0),  # the first whole word decides; "incorrectly" is not one
    ("I cannot tell", None), ("", None), (None, None)])
def test_parse_judgement(text, reward):
    assert parse_judgement(text) == reward


class ScriptedJudge:
    """Says CORRECT to every judge prompt and records what it was shown."""

    name = "scripted"

    def __init__(self):
        self.prompts = []

    def complete(self, conversations, *, max_tokens, temperature):
        self.prompts += conversations
        return [Completion("CORRECT") for _ in conversations]


def test_judge_sees_problem_reference_and_response():
    p = Problem("p", "What is 2 + 2?", "4", "gsm8k")
    prompt = judge_prompt(p, "2 + 2 = 5, so \\boxed{5}")[-1]["content"]
    assert "What is 2 + 2?" in prompt and "<REFERENCE_ANSWER>4</REFERENCE_ANSWER>" in prompt and "\\boxed{5}" in prompt
    failing = type("Down", (), {"complete": lambda self, c, **kw: [Completion(None, "timeout")] * len(c)})()
    (verdict,) = judge_rewards(failing, [(p, "x")])
    assert verdict.reward == -1.0 and "timeout" in verdict.detail


def test_sessions_act_on_the_judge_and_accuracy_stays_the_rules(tmp_path):
    model = load_model(str(tiny_chat_model(tmp_path / "model")))
    judge = ScriptedJudge()
    cfg = EngineConfig(method="rosa", max_turns=3, rows=2, sampling=SamplingConfig(max_new_tokens=6),
                       max_context=512, reward="model")
    problems = [Problem(f"p{i}", f"Which is right? (A) {i} (B) {i + 1}", "B", "choice") for i in range(3)]
    finished = []
    engine = TurnEngine(model, cfg, judge)
    try:
        engine.run(problems, finished.append)
    finally:
        engine.close()
    assert len(judge.prompts) == 3
    for s in finished:
        (turn,) = s.turns  # the judge said CORRECT: every session ended after one turn, no update ran
        assert turn.reward == 1.0 and turn.update is None
        assert turn.rule_reward in (1.0, -1.0)
        assert s.solved_at == (1 if turn.rule_reward > 0 else None)
