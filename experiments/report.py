"""Rewrite a sweep's report from its folder alone (config.json and the records).

    python -m experiments.report --run_dir=results/qwen-gsm8k

The sweep writes the report when it finishes; this command is for a folder whose run is still going or
was interrupted, e.g. a study committed as its records grow.
"""

from __future__ import annotations

from absl import app, flags

from experiments.common import run_from_flags
from rosa2_jax.tasks.data import DatasetError, load_problems
from rosa2_jax.study.report import write_report

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", None, "a sweep's folder (config.json + records*.jsonl)", required=True)


def main(_):
    run_dir, config, records = run_from_flags()
    try:  # the problems' text only lets the Words table count numbers that are not in the problem
        questions = {p.id: p.question for p in load_problems(config["dataset"], cache_dir=config.get("cache_dir"))[0]}
    except DatasetError as e:
        questions = None
        print(f"the Words table counts no new numbers: {e}")
    # Not the sweep's own figures (wall time, memory): those belong to a run, and this is a rewrite.
    _, md = write_report(run_dir, records, config["max_turns"],
                         {"model": config["model"], "dataset": config["dataset"], "written_by": "experiments.report"},
                         questions)
    print(md)


if __name__ == "__main__":
    app.run(main)
