"""Rewrite a sweep's report from its folder alone (config.json and the records).

    python -m experiments.report --run_dir=results/qwen-gsm8k

The sweep writes the report when it finishes; this command is for a folder whose run is still going or
was interrupted, e.g. a study committed as its records grow.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags

from rosa2_jax.runs import read_records
from rosa2_jax.tasks.report import write_report

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", None, "a sweep's folder (config.json + records*.jsonl)", required=True)


def main(_):
    run_dir = Path(FLAGS.run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    records = [r for r in read_records(run_dir) if r["method"] in config["methods"]]
    _, md = write_report(run_dir, records, config["max_turns"],
                         {"model": config["model"], "dataset": config["dataset"], "complete": False})
    print(md)


if __name__ == "__main__":
    app.run(main)
