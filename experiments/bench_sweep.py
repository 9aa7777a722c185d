"""Sweep throughput of the two schedulers side by side: problems per hour, useful generated tokens per second,
and the decode batch's occupancy (generated tokens / (decode steps x rows)).

    python -m experiments.bench_sweep --model=qwen2.5-coder-0.5b-instruct --methods=baseline,rosa \
        --num_problems=16 --max_turns=2 --max_new_tokens=512

Both engines run the same problems with the same settings in this process, so their ratio is comparable;
the absolute times are this machine's. Sampling is the sweep's default (temperature 0.7, top-p 0.8).

Methods with a Words stream run once per `--text_models` entry: `local` (the policy as critic, which the
token engine decodes in its rows) or `local:<model spec>` (another loaded copy, generating apart):

    python -m experiments.bench_sweep --model=qwen2.5-coder-0.5b-instruct --methods=words --schedulers=token \
        --text_models=local,local:qwen2.5-coder-0.5b-instruct

`--together` also runs all the methods in one token engine, as the sweep does, against their runs one after
another.
"""

from __future__ import annotations

import json
import time

from absl import app, flags, logging

from experiments.common import (define_engine_flags, define_model_flags, define_sampling_flags,
                                engine_config_from_flags, local_critic, model_from_flags)
from rosa2_jax.adapt.text_models import make_text_model
from rosa2_jax.engine import METHODS, SCHEDULERS, EngineConfig
from rosa2_jax.tasks.data import load_problems

FLAGS = flags.FLAGS
define_model_flags()
define_sampling_flags(max_new_tokens=512, temperature=0.7, top_p=0.8)
define_engine_flags(max_turns=2, slots=8, max_context=2048)
flags.DEFINE_string("dataset", "gsm8k", "data set")
flags.DEFINE_integer("num_problems", 16, "problems per method")
flags.DEFINE_list("methods", ["baseline", "rosa"], "methods")
flags.DEFINE_list("text_models", ["local"], "critics of the Words methods: local (the policy) or local:<model spec>")
flags.DEFINE_list("schedulers", ["turn", "token"], "engines to time")
flags.DEFINE_bool("warmup", True, "first run every engine and method on two problems, so that the timed runs "
                  "compile little (--nowarmup counts compilation in both, which weighs on the token engine's "
                  "larger set of programs)")
flags.DEFINE_bool("together", False, "also run every method in one token engine, as the sweep does, and compare "
                  "its wall time with the methods' token-engine runs one after another")
flags.DEFINE_string("out", None, "also write the figures to this JSON file")


def measure(scheduler: str, model, text_model, method, problems) -> dict:
    """Run `problems` (or engine.Work pairs, whose own method wins over `method`) and return the figures."""
    finished = []
    start = time.perf_counter()
    with SCHEDULERS[scheduler](model, engine_config_from_flags(method, model.cfg.num_layers), text_model) as engine:
        engine.run(problems, finished.append)
    wall = time.perf_counter() - start
    st = engine.stats
    useful = sum(t.response_tokens for s in finished for t in s.turns)
    turns = sum(len(s.turns) for s in finished)
    figures = {"wall_s": wall, "problems_per_hour": 3600 * len(finished) / wall, "turns": turns,
               "useful_tokens_per_s": useful / wall, "occupancy": st.occupancy,
               "solved": sum(s.solved_at is not None for s in finished)}
    if scheduler == "token":
        figures |= {"prefilled": st.prefilled, "reused": st.reused, "text_reused": st.text_reused,
                    "text_generated": st.text_generated, "decode_s": st.decode_s, "prefill_s": st.prefill_s,
                    "update_s": st.update_s, "updates": st.updates}
    return figures


def _figures(r: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())


def main(_):
    logging.set_verbosity(logging.WARNING)
    model = model_from_flags()
    critics = {spec: make_text_model("local", model=local_critic(spec.partition(":")[2], model))
               for spec in FLAGS.text_models}
    problems, _ = load_problems(FLAGS.dataset, limit=FLAGS.num_problems, seed=FLAGS.seed, cache_dir=FLAGS.cache_dir)
    runs = [(method, critic if len(critics) > 1 and words else None, critics[critic])
            for method in FLAGS.methods
            for words in [any(k.needs_text_model for k in METHODS[method].all_streams(
                EngineConfig(method, max_turns=FLAGS.max_turns)))]
            for critic in (critics if words else list(critics)[:1])]
    # A first pass on two problems compiles every program both engines use, so the timed runs do not.
    for method, _, text_model in runs if FLAGS.warmup else ():
        for name in FLAGS.schedulers:
            measure(name, model, text_model, method, problems[:2])
    results = {}
    for method, critic, text_model in runs:
        label = method if critic is None else f"{method}[{critic}]"
        for name in FLAGS.schedulers:
            results[f"{label}/{name}"] = r = measure(name, model, text_model, method, problems)
            print(f"{label:9s} {name:5s} {_figures(r)}", flush=True)
        if {"turn", "token"} <= set(FLAGS.schedulers):
            turn, token = results[f"{label}/turn"], results[f"{label}/token"]
            print(f"{label}: token/turn problems per hour {token['problems_per_hour'] / turn['problems_per_hour']:.2f}x, "
                  f"useful tokens/s {token['useful_tokens_per_s'] / turn['useful_tokens_per_s']:.2f}x")
    if FLAGS.together:
        if "token" not in FLAGS.schedulers or len(critics) > 1:
            raise app.UsageError("--together compares with the token engine's runs of one critic")
        text_model = next(iter(critics.values()))
        for some in ([problems[:2]] if FLAGS.warmup else []) + [problems]:
            r = measure("token", model, text_model, FLAGS.methods[0], [(m, p) for m in FLAGS.methods for p in some])
        results["together"] = r
        apart = sum(results[f"{m}/token"]["wall_s"] for m in FLAGS.methods)
        print(f"together  token {_figures(r)}")
        print(f"together: {apart:.0f} s one method after another, {r['wall_s']:.0f} s in one engine: "
              f"{apart / r['wall_s']:.2f}x", flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"flags": {k: FLAGS[k].value for k in ("model", "dataset", "num_problems", "max_turns", "slots",
                                                              "sessions", "decode_steps", "max_new_tokens",
                                                              "text_models")},
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
