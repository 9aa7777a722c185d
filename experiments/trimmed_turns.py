"""Which turns of a sweep had their history trimmed to the prompt budget, from its folder (config.json, records).

    python -m experiments.trimmed_turns --run_dir=results/qwen05-gsm8k-k5-study2

Rebuilds each turn's whole history from the records, renders it with the run's chat template (the model's
tokenizer; the weights load too) and counts, per method, the turns over the budget (max_context - max_new_tokens).
Every recorded prompt length is checked against the engine's trimming rule; a turn that disagrees is listed.
"""

from __future__ import annotations

from absl import app, flags

from experiments.common import run_from_flags
from rosa2_jax.checkpoint import load_model
from rosa2_jax.engine.history import prompt_budget
from rosa2_jax.study.prompts import trimmed_turns

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", None, "a sweep's folder (config.json + records*.jsonl)", required=True)


def main(_):
    _, config, records = run_from_flags()
    model = load_model(config["model"], cache_dir=config.get("cache_dir"))
    max_prompt = prompt_budget(config["max_context"], model.cfg.max_position_embeddings, config["max_new_tokens"])
    counts = trimmed_turns(records, model.sampler.render, max_prompt)
    print(f"prompt budget {max_prompt} ids\n")
    print("| method | turns | trimmed | trimmed by turn | longest whole history | prompts not from the rule |")
    print("|---|---|---|---|---|---|")
    for method, c in counts.items():
        by_turn = ", ".join(f"turn {t}: {n}" for t, n in sorted(c["trimmed_by_turn"].items())) or "-"
        print(f"| {method} | {c['turns']} | {c['trimmed']} | {by_turn} | {c['longest_history']} "
              f"| {len(c['mismatched'])} |")
    for method, c in counts.items():
        for problem, turn, recorded, rule in c["mismatched"]:
            print(f"{method} {problem} turn {turn}: recorded {recorded} prompt ids, the rule gives {rule}")


if __name__ == "__main__":
    app.run(main)
