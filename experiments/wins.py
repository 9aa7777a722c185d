"""The problems one method solved and another did not, laid out for a hand check of each derivation.

    python -m experiments.wins --run_dir=results/qwen05-gsm8k-k5-study2 --against=baseline \
        --out=results/qwen05-gsm8k-k5-study2/WINS.md

For every method of the folder (or --methods) against --against: each problem it solved within K that the other
did not, with the question, the reference solution where the data set ships one, the message the solving turn
answered and its response, and a "Hand check" line to fill in: "right: ..." (the derivation is right) or "number
only: ..." (the right number by wrong reasoning). Written again over a growing run, --out keeps the lines already
filled in, and each section's heading counts them.
"""

from __future__ import annotations

import re
from pathlib import Path

from absl import app, flags

from experiments.common import run_from_flags
from rosa2_jax.tasks.data import load_problems

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", None, "a sweep's folder (config.json + records*.jsonl)", required=True)
flags.DEFINE_list("methods", [], "methods whose wins to list (default: every method of the folder but --against)")
flags.DEFINE_string("against", "baseline", "the method a win is counted against")
flags.DEFINE_string("out", None, "where to write (default stdout); its filled hand checks are kept")

VERDICTS = ("right", "number only")  # how a filled hand check begins


def wins(records: list[dict], method: str, against: str) -> list[dict]:
    """`method`'s records of the problems it solved and `against` ran without solving, in problem order."""
    solved = {r["problem_id"]: r["solved_at"] is not None for r in records if r["method"] == against}
    return sorted((r for r in records if r["method"] == method and r["solved_at"] is not None
                   and solved.get(r["problem_id"]) is False), key=lambda r: r["problem_id"])


def hand_checks(text: str) -> dict[tuple[str, str, str], str]:
    """The filled "Hand check:" lines of an earlier output, keyed by (method, against, problem id)."""
    checks, section, problem, fence = {}, None, None, None
    for line in text.splitlines():
        if fence:  # a response may hold headings of its own
            fence = None if line == fence else fence
        elif line.startswith("```"):
            fence = line[:len(line) - len(line.lstrip("`"))]
        elif m := re.match(r"## (\S+) over (\S+): ", line):
            section, problem = m.groups(), None
        elif m := re.match(r"### (\S+) \(", line):
            problem = m.group(1)
        elif line.startswith("Hand check:") and section and problem and line[len("Hand check:"):].strip():
            checks[(*section, problem)] = line[len("Hand check:"):].strip()
    return checks


def render(method: str, against: str, won: list[dict], problems: dict, checks: dict | None = None) -> str:
    checks = {pid: c for (m, a, pid), c in (checks or {}).items() if (m, a) == (method, against)}
    filled = [checks[r["problem_id"]] for r in won if r["problem_id"] in checks]
    tally = ", ".join(f"{sum(c.lower().startswith(v) for c in filled)} {v}" for v in VERDICTS)
    lines = [f"## {method} over {against}: {len(won)} problems (hand checked: {tally}; "
             f"{len(won) - len(filled)} open)", ""]
    for r in won:
        turn = r["turns"][r["solved_at"] - 1]
        problem = problems.get(r["problem_id"])
        lines += [f"### {r['problem_id']} (turn {r['solved_at']}; reference {r['answer']})", ""]
        if problem is not None:
            lines += ["Question:", "", fenced(problem.question), ""]
            if "solution" in problem.meta:
                lines += ["Reference solution:", "", fenced(problem.meta["solution"]), ""]
        if problem is None or turn["user"] != problem.question:
            lines += [f"Turn {r['solved_at']} answered:", "", fenced(turn["user"]), ""]
        lines += ["Response:", "", fenced(turn["response"]), "", f"Hand check: {checks.get(r['problem_id'], '')}", ""]
    return "\n".join(lines)


def fenced(text: str) -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}text\n{text}\n{fence}"


def main(_):
    run_dir, config, records = run_from_flags()
    methods = FLAGS.methods or [m for m in config["methods"] if m != FLAGS.against]
    unknown = sorted(set(methods + [FLAGS.against]) - set(config["methods"]))
    if unknown:
        raise app.UsageError(f"{unknown} not among the folder's methods {config['methods']}")
    problems = {p.id: p for p in load_problems(config["dataset"], cache_dir=config.get("cache_dir"))[0]}
    out = Path(FLAGS.out) if FLAGS.out else None
    checks = hand_checks(out.read_text()) if out and out.exists() else {}
    text = "\n".join([f"# Wins in {run_dir} against {FLAGS.against}\n"] + [
        render(method, FLAGS.against, wins(records, method, FLAGS.against), problems, checks) for method in methods])
    if out:
        out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    app.run(main)
