"""Multi-turn problem solving over a data set, for every method: the main job of rosa2_jax.

    python -m experiments.math_sweep                      # built-in 0.5B, 8 MAWPS problems, baseline/rosa/rosa2
    python -m experiments.math_sweep --model=qwen2.5-coder-0.5b-instruct --dataset=gsm8k --num_problems=100 \
        --methods=baseline,rosa,rosa2 --run_dir=runs/qwen-gsm8k

Writes into --run_dir: records.jsonl (one line per finished problem and method), summary.json, summary.md,
accuracy_by_turn.png. Rerunning into the same folder skips finished problems and loses none; `kill -USR1 <pid>`
finishes the sessions in flight and admits no more (a plain kill loses only the turns in progress).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import jax
from absl import app, flags, logging
from tqdm.auto import tqdm

from experiments import common
from rosa2_jax.adapt.words import WORDS_STREAM
from rosa2_jax.distributed import initialize, process_info
from rosa2_jax.engine import METHODS, SCHEDULERS
from rosa2_jax.model.generation import SAMPLER, decode_path
from rosa2_jax.model.sharding import make_mesh
from rosa2_jax.study.runs import RunInUse, lock_run
from rosa2_jax.study.study import Study, StudyConfig, StudyConfigError

FLAGS = flags.FLAGS
# The no-flag run is the smallest that shows the method at work in 15 minutes on 2 CPU cores: a model
# that boxes its answers and solves some problems only after turn 1 (BUILD_NOTES.md, "The default run").
common.define_model_flags(default="qwen2.5-coder-0.5b-instruct")
flags.DEFINE_string("dataset", "mawps", "gsm8k, svamp, asdiv, mawps, math, math500, aime24, aime25, mmlu-stem, "
                    "humaneval, champ, a local .jsonl/.json/.parquet file, or hub:org/name[:split]")
flags.DEFINE_integer("num_problems", 8, "problems drawn with --seed (0 = all)")
flags.DEFINE_list("methods", ["baseline", "rosa", "rosa2"], f"methods to run, from {', '.join(METHODS)}")
flags.DEFINE_enum("scheduler", "token", list(SCHEDULERS), "token: rows refilled as they stop from a pool of "
                  "--sessions sessions, kept caches reused between turns, Weights steps on buckets of up to "
                  "--slots failed sessions; turn: every slot generates one turn, then all adapt (the reference)")
flags.DEFINE_string("run_dir", "runs/default", "output folder (resumable)")
flags.DEFINE_integer("problems_per_round", 0, "admit the problems in blocks of this many, every method on a "
                     "block before the next block (0 = one block), so that a study stopped at any point has every "
                     "method on nearly the same problems")
flags.DEFINE_list("mesh", None, "DATA,MODEL: this process's device mesh, session slots split over DATA and "
                  "weights tensor-parallel over MODEL (default: every local device on DATA)")
flags.DEFINE_bool("distributed", False, "start jax.distributed; the three flags below default to what JAX "
                  "detects (TPU pod, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS)")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (implies --distributed)")
flags.DEFINE_integer("num_processes", None, "number of processes (implies --distributed)")
flags.DEFINE_integer("process_id", None, "this process's index (implies --distributed)")
common.define_sampling_flags(max_new_tokens=256, temperature=0.7, top_p=0.8)
common.define_engine_flags(max_turns=2, slots=8, max_context=1024)
flags.adopt_module_key_flags(common)  # config.json records the shared flags with this module's own


def main(_):
    logging.set_verbosity(logging.WARNING)
    common.keep_compiled_programs()
    if unknown := [m for m in FLAGS.methods if m not in METHODS]:
        raise app.UsageError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if FLAGS.text_model == "rule" and FLAGS.reward == "model":
        raise app.UsageError("--reward=model needs a text model that can judge: --text_model=local[:spec] or openai")
    info = (initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
            if FLAGS.distributed or any(v is not None for v in (FLAGS.coordinator_address, FLAGS.num_processes,
                                                                FLAGS.process_id))
            else process_info())
    try:
        data, model_axis = (jax.local_device_count(), 1) if not FLAGS.mesh else map(int, FLAGS.mesh)
        mesh = make_mesh(data, model_axis)
    except ValueError as e:
        raise app.UsageError(f"--mesh: {e}") from None
    study = Study(Path(FLAGS.run_dir), StudyConfig(FLAGS.dataset, tuple(FLAGS.methods), FLAGS.num_problems,
                                                   FLAGS.seed, FLAGS.scheduler, FLAGS.problems_per_round,
                                                   FLAGS.cache_dir), info, log=tqdm.write)
    try:
        lock = lock_run(study.run_dir, info)
    except RunInUse as e:
        raise app.UsageError(str(e)) from None
    with lock:
        if info.is_main:
            key_flags = FLAGS.get_key_flags_for_module(sys.modules[__name__])
            # A folder from before these were recorded drew over the whole vocabulary, rewrote the whole message and
            # sized its cache to each turn.
            code = {"sampler": SAMPLER, "words_stream": WORDS_STREAM,
                    "decode_path": decode_path(FLAGS.decode_dtype, mesh)}
            before = {"sampler": "full-vocabulary", "words_stream": "rewrite", "decode_path": "turn-sized-cache"}
            try:
                study.check_config({f.name: f.value for f in key_flags} | code,
                                   {f.name: f.default for f in key_flags} | before)
            except StudyConfigError as e:
                hint = (" decode_path names this machine's decode kernels (ROSA2_JAX_ATTENTION=off, "
                        "ROSA2_JAX_AMX=off and ROSA2_JAX_FMA_MATMUL=off turn them off) and the code's decode "
                        "calls and prefill: a folder recorded with another sampler or path resumes with the code "
                        "it was recorded with (a path with -kept-layers but not -query-blocks: a063350 or "
                        "earlier; a path with -prompt-sized-prefill but not -kept-layers: 86d0eb9 or earlier; a "
                        "path with -grouped-prefill: 0420417 or earlier; a bfloat16 path without -full-calls: "
                        "41b8a06 or earlier; a path without -grouped-: 845bb70 or earlier)."
                        if "--decode_path" in str(e) or "--sampler" in str(e) else "")
                raise app.UsageError(str(e) + hint) from None
        work = study.prepare()
        model = common.model_from_flags(mesh)
        text_model = common.text_model_from_flags(model, mesh)
        bar = tqdm(total=len(work), desc="problems", unit="problem", position=info.index if info.count > 1 else None)

        def record(session):
            bar.update(1)
            bar.set_postfix(method=session.method)
            if bar.n % 16 == 0:  # where the time went so far
                bar.write(f"after {bar.n} problems: {study.engine.stats}")

        def drain(signum, frame):
            study.stop()
            bar.write(f"{signal.Signals(signum).name}: finishing the sessions in flight and admitting no more")

        previous = signal.signal(signal.SIGUSR1, drain)
        try:
            with bar:
                study.run(model, text_model, common.engine_config_from_flags(FLAGS.methods[0], model.cfg.num_layers),
                          record, meta={"model": FLAGS.model})
        finally:
            signal.signal(signal.SIGUSR1, previous)


if __name__ == "__main__":
    app.run(main)
