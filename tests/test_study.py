"""The Study in process: a drained run resumes to the records of a whole one, shares of two processes merge into
them, and a folder refuses settings that would change its trajectories."""

import json

import pytest
from conftest import tiny_chat_model

from rosa2_jax.checkpoint import load_model
from rosa2_jax.distributed import ProcessInfo
from rosa2_jax.engine import EngineConfig
from rosa2_jax.model.generation import SamplingConfig
from rosa2_jax.study.runs import IN_FLIGHT, read_records
from rosa2_jax.study.study import Study, StudyConfig, StudyConfigError

PROBLEMS = [{"id": f"p{i}", "question": f"Which option is right? (A) {i} (B) {i + 1} (C) {i + 2}",
             "answer": "ABC"[i % 3], "kind": "choice"} for i in range(5)]
METHODS = ("baseline", "rosa")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("study")
    data = base / "problems.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    model = load_model(str(tiny_chat_model(base / "model")))
    engine = EngineConfig(method="baseline", max_turns=3, rows=2, sampling=SamplingConfig(max_new_tokens=8,
                                                                                           temperature=0.0),
                          max_context=512)
    return base, StudyConfig(str(data), METHODS, scheduler="turn"), model, engine


def outcomes(run_dir):
    return sorted((r["method"], r["problem_id"], r["solved_at"], [t["response"] for t in r["turns"]])
                  for r in read_records(run_dir))


@pytest.fixture(scope="module")
def whole(setup):
    base, cfg, model, engine = setup
    study = Study(base / "whole", cfg, log=lambda _: None)
    study.prepare()
    summary = study.run(model, None, engine)
    assert summary is not None and len(read_records(base / "whole")) == len(PROBLEMS) * len(METHODS)
    return outcomes(base / "whole")


def test_a_stopped_study_resumes_to_the_records_of_a_whole_one(setup, whole, tmp_path):
    _, cfg, model, engine = setup
    study = Study(tmp_path, cfg, log=lambda _: None)
    study.prepare()
    study.run(model, None, engine, on_record=lambda s: study.stop())  # the sessions in flight still finish
    first = read_records(tmp_path)
    assert 0 < len(first) < len(PROBLEMS) * len(METHODS)
    assert not (tmp_path / IN_FLIGHT).exists()  # nothing left in flight after a drain
    again = Study(tmp_path, cfg, log=lambda _: None)
    assert len(again.prepare()) == len(PROBLEMS) * len(METHODS) - len(first)  # finished work is not redone
    again.run(model, None, engine)
    assert outcomes(tmp_path) == whole


def test_two_processes_shares_merge_into_the_whole_records(setup, whole, tmp_path):
    _, cfg, model, engine = setup
    studies = [Study(tmp_path, cfg, ProcessInfo(i, 2), log=lambda _: None) for i in (1, 0)]
    for study in studies:  # both read the folder before either appends, as at the barrier of a real run
        study.prepare()
    assert studies[0].run(model, None, engine) is None  # only process 0 reports
    assert studies[1].run(model, None, engine) is not None
    assert outcomes(tmp_path) == whole
    assert sorted(p.name for p in tmp_path.glob("records*.jsonl")) == ["records.jsonl"]


def test_a_folder_refuses_settings_that_change_trajectories(setup, tmp_path):
    _, cfg, _, _ = setup
    study = Study(tmp_path, cfg)
    study.check_config({"seed": 0, "slots": 8}, {})
    study.check_config({"seed": 0, "slots": 4}, {})  # scheduling only
    with pytest.raises(StudyConfigError, match="--seed: 0 in the folder, 1 now"):
        study.check_config({"seed": 1, "slots": 4}, {})
    study.check_config({"seed": 0, "slots": 4, "beta": 1.0}, {"beta": 1.0})  # a new setting at its default


def test_unknown_methods_and_schedulers_are_refused():
    with pytest.raises(ValueError, match="unknown method 'rosa3'"):
        StudyConfig("gsm8k", ("rosa3",))
    with pytest.raises(ValueError, match="unknown scheduler"):
        StudyConfig("gsm8k", ("rosa",), scheduler="fast")


def test_a_snapshot_keeps_every_session_field_but_the_problem_and_its_bookkeeping():
    """A field added to Session is either in the snapshot or named here: a restore must not drop state."""
    import dataclasses

    from rosa2_jax.engine.session import SNAPSHOT_FIELDS, Session
    from rosa2_jax.tasks.problem import Problem

    assert {f.name for f in dataclasses.fields(Session)} - set(SNAPSHOT_FIELDS) == {"problem", "method", "error",
                                                                                     "restored"}
    problem = Problem("p", "What is 1 + 1?", "2", "gsm8k")
    session = Session(problem, "rosa", "system", [{"role": "user", "content": "What is 1 + 1?"}], turn=2,
                      previous_feedback="check", seconds=1.5, response_ids=[[1, 2], [3]])
    restored = Session.from_snapshot(json.loads(json.dumps(session.snapshot())), problem)
    assert restored == dataclasses.replace(session, restored=True)
