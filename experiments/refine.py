"""Probe the Words stream without a sweep: refine failed attempts, print how good the messages are, and with
--next_turn let the policy answer once more with the refined message and with the raw feedback (same seeds).

    python -m experiments.refine --from_run=RUN_DIR --attempts=attempts.jsonl --out=refined.jsonl --next_turn

Input rows (--attempts): {"id", "question", "answer", "attempt", "failed", "solution"}; `answer` and the optional
worked `solution` reach only the leakage guard and a reference-aware critic (--critic_reference); `failed` is the
extracted failed answer or null. --from_run first writes that file from a sweep folder's failed first turns.
Output rows (--out): {"id", "message", "status", "critique", "instruction", "category", "candidates", "tokens"}
and, with --next_turn, {"next": {"refined": {"response", "solved"}, "raw": {...}}}.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from absl import app, flags

from experiments import common
from experiments.common import (define_model_flags, define_sampling_flags, define_words_flags, model_from_flags,
                                sampling_from_flags)
from rosa2_jax.adapt.quality import WordsStep, words_quality
from rosa2_jax.adapt.words import FEEDBACK_TEMPLATE, RefineRequest, refine_feedback
from rosa2_jax.engine import MATH_SYSTEM_PROMPT, session_seed
from rosa2_jax.engine.streams import critic_reference
from rosa2_jax.study.runs import read_records
from rosa2_jax.tasks.data import load_problems
from rosa2_jax.tasks.problem import Problem
from rosa2_jax.tasks.rewards import verify
from rosa2_jax.study.stats import paired_comparison

FLAGS = flags.FLAGS
define_model_flags(default="qwen2.5-coder-0.5b-instruct")
define_sampling_flags(max_new_tokens=512, temperature=0.7, top_p=0.8)
define_words_flags()
flags.DEFINE_string("attempts", None, "failed attempts, one JSON row each (written first with --from_run)")
flags.DEFINE_string("out", None, "where the refined messages go, one JSON row per attempt")
flags.DEFINE_string("from_run", None, "a math_sweep folder: write --attempts from its failed first turns")
flags.DEFINE_bool("next_turn", False, "let the policy answer once more with the refined message and the raw feedback")
flags.DEFINE_integer("batch", 64, "attempts per batched text-model call")
flags.DEFINE_integer("seed", 0, "seeds the retries and the next turns, as a sweep's --seed does")
flags.mark_flags_as_required(["attempts", "out"])
flags.adopt_module_key_flags(common)


def attempts_from_run(run_dir: Path) -> list[dict]:
    """The failed first turns of a sweep folder's records, with their problems from the folder's data set."""
    config = json.loads((run_dir / "config.json").read_text())
    problems = {p.id: p for p in load_problems(config["dataset"], cache_dir=config.get("cache_dir"))[0]}
    rows = []
    for r in read_records(run_dir):
        turns = r["turns"]
        if not turns or turns[0]["reward"] > 0 or r["problem_id"] not in problems:
            continue
        p = problems[r["problem_id"]]
        rows.append({"id": p.id, "question": p.question, "answer": p.answer, "attempt": turns[0]["response"],
                     "failed": turns[0]["extracted"], "solution": p.meta.get("solution"),
                     "answer_tokens": turns[0]["response_tokens"]})
    return sorted(rows, key=lambda row: row["id"])


def _problem(row: dict) -> Problem:
    return Problem(row["id"], row["question"], row["answer"], "gsm8k", {"solution": row.get("solution")})


def next_turns(model, rows: list[dict], messages: list[str]) -> list[dict]:
    """The policy's answer after each attempt and message, seeded by the attempt's id as a sweep's turn 2."""
    sampler = model.sampler
    prompts = [sampler.render([{"role": "system", "content": MATH_SYSTEM_PROMPT},
                               {"role": "user", "content": row["question"]},
                               {"role": "assistant", "content": row["attempt"]},
                               {"role": "user", "content": message}]) for row, message in zip(rows, messages)]
    seeds = [session_seed(FLAGS.seed, row["id"], 2) for row in rows]
    out = []
    for row, g in zip(rows, sampler.generate(prompts, sampling_from_flags(), seeds=seeds)):
        response = sampler.decode(g.tokens)
        out.append({"response": response, "solved": verify(_problem(row), response, boxed_only=True).reward > 0})
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def quality_table(quality: dict) -> str:
    statuses = ", ".join(f"{k} {_pct(v)}" for k, v in quality["status"].items())
    return "\n".join([
        f"Words steps: {quality['steps']}",
        f"instructive {_pct(quality['instructive'])} | verdict kept {_pct(quality['verdict_kept'])} | "
        f"bare {_pct(quality['bare'])} | new numbers {_pct(quality['new_numbers'])} | "
        f"failed answer restated {_pct(quality['states_failed'])} | leaks {_pct(quality['leaks'])}",
        f"paths: {statuses}",
        f"openings: most common {quality['top_opening']!r} in {_pct(quality['top_opening_share'])}, "
        f"distinct {_pct(quality['distinct_openings'])}",
        f"text-model tokens per failed-answer token: {quality['tokens_per_answer_token']:.2f}; steps spending more "
        f"than half their answer's tokens: {_pct(quality['over_half_the_answer'])}"])


def main(argv):
    del argv
    attempts = Path(FLAGS.attempts)
    if FLAGS.from_run:
        rows = attempts_from_run(Path(FLAGS.from_run))
        attempts.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{len(rows)} failed first turns of {FLAGS.from_run} -> {attempts}")
    if not attempts.exists():
        raise app.UsageError(f"--attempts={attempts} does not exist; write it with --from_run=<a math_sweep folder>")
    rows = [json.loads(line) for line in attempts.read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        missing = {"id", "question", "answer", "attempt", "failed"} - set(row)
        if missing:
            raise app.UsageError(f"{attempts} row {i + 1} lacks {sorted(missing)}")
    common.keep_compiled_programs()
    model = model_from_flags()
    text_model = common.text_model_from_flags(model)
    requests = [RefineRequest(problem=row["question"], attempt=row["attempt"], extracted_answer=row["failed"],
                              current=FEEDBACK_TEMPLATE, ground_truth=row["answer"],
                              reference=critic_reference(_problem(row), FLAGS.critic_reference),
                              reference_kind=FLAGS.critic_reference, seed=session_seed(FLAGS.seed, row["id"], 1))
                for row in rows]
    results = []
    for start in range(0, len(requests), FLAGS.batch):
        results += refine_feedback(text_model, requests[start: start + FLAGS.batch], critic_tokens=FLAGS.critic_tokens,
                                   rewrite_tokens=FLAGS.rewrite_tokens, retries=FLAGS.words_retries)
    out = [{"id": row["id"], **{k: v for k, v in dataclasses.asdict(r).items() if k != "semantic_shift"}}
           for row, r in zip(rows, results)]
    if FLAGS.next_turn:
        refined = next_turns(model, rows, [r.message for r in results])
        raw = next_turns(model, rows, [FEEDBACK_TEMPLATE] * len(rows))
        for row, a, b in zip(out, refined, raw):
            row["next"] = {"refined": a, "raw": b}
    Path(FLAGS.out).write_text("".join(json.dumps(row) + "\n" for row in out))
    quality = words_quality(WordsStep(row, a["failed"], a["answer"], a["question"], a.get("answer_tokens"))
                            for row, a in zip(out, rows))
    print(f"critic reference: {FLAGS.critic_reference}; text model: {text_model.name}")
    print(quality_table(quality))
    if FLAGS.next_turn:
        a = {row["id"]: row["next"]["refined"]["solved"] for row in out}
        b = {row["id"]: row["next"]["raw"]["solved"] for row in out}
        c = paired_comparison(a, b)
        print(f"next turn solved: refined {sum(a.values())}/{len(a)}, raw {sum(b.values())}/{len(b)}; "
              f"only refined {c['only_a']}, "
              f"only raw {c['only_b']}; exact McNemar p = {c['mcnemar_p']:.3g}")


if __name__ == "__main__":
    app.run(main)
