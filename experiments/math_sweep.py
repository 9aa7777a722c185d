"""Multi-turn problem solving over a data set, for every method: the main job of rosa2_jax.

    python -m experiments.math_sweep                      # built-in 0.5B, 8 MAWPS problems, baseline/rosa/rosa2
    python -m experiments.math_sweep --model=qwen2.5-coder-0.5b-instruct --dataset=gsm8k --num_problems=100 \
        --methods=baseline,rosa,rosa2 --run_dir=runs/qwen-gsm8k

Writes into --run_dir: records.jsonl (one line per finished problem and method), summary.json, summary.md,
accuracy_by_turn.png. Rerunning into the same folder skips finished problems and loses none.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import signal
import sys
import time
from pathlib import Path

import jax
from absl import app, flags, logging
from jax.sharding import Mesh
from tqdm.auto import tqdm

from experiments import common
from experiments.common import (define_model_flags, define_sampling_flags, define_words_flags, model_from_flags,
                                sampling_from_flags)
from rosa2_jax.adapt.rosa import RESIDUALS, TILTS
from rosa2_jax.adapt.words import WORDS_STREAM
from rosa2_jax.distributed import ProcessInfo, barrier, initialize, process_info, share
from rosa2_jax.engine import REWARDS, EngineConfig, Session, method_of
from rosa2_jax.scheduler import SCHEDULERS, TokenEngine
from rosa2_jax.methods import ADAPTERS, METHODS, PRESETS, WeightsPreset
from rosa2_jax.model.generation import SAMPLER
from rosa2_jax.model.sharding import make_mesh
from rosa2_jax.runs import (ADAPTER_CACHE, RECORDS, RunInUse, drop_torn_tail, in_flight_path, lock_run, merge_records,
                            read_in_flight, read_records, records_path, write_in_flight)
from rosa2_jax.tasks.data import load_problems
from rosa2_jax.tasks.report import write_report
from rosa2_jax.tasks.rewards import EQUIVALENCES

FLAGS = flags.FLAGS
# --remat=auto stores a Weights pass's activations up to this many tokens: ~2.2 MB a token on the 0.5B with the
# fast preset, so ~4.5 GB (BUILD_NOTES.md, "Weights steps on long histories").
AUTO_STORED_TOKENS = 2048
# The no-flag run is the smallest that shows the method at work in 15 minutes on 2 CPU cores: a model
# that boxes its answers and solves some problems only after turn 1 (BUILD_NOTES.md, "Item 4").
define_model_flags(default="qwen2.5-coder-0.5b-instruct")
flags.DEFINE_string("dataset", "mawps", "gsm8k, svamp, asdiv, mawps, math, math500, aime24, aime25, mmlu-stem, "
                    "humaneval, champ, a local .jsonl/.json/.parquet file, or hub:org/name[:split]")
flags.DEFINE_integer("num_problems", 8, "problems drawn with --seed (0 = all)")
flags.DEFINE_list("methods", ["baseline", "rosa", "rosa2"], f"methods to run, from {', '.join(METHODS)}")
flags.DEFINE_integer("max_turns", 2, "K: turns per problem")
flags.DEFINE_integer("slots", 8, "decode batch: rows generating at once (with --scheduler=turn, the sessions)")
flags.DEFINE_enum("scheduler", "token", list(SCHEDULERS), "token: rows refilled as they stop from a pool of "
                  "--sessions sessions, kept caches reused between turns, Weights steps on buckets of up to "
                  "--slots failed sessions; turn: every slot generates one turn, then all adapt (the reference)")
flags.DEFINE_integer("sessions", 0, "--scheduler=token: sessions in the pool (0 = twice --slots)")
flags.DEFINE_integer("decode_steps", 16,
                     "--scheduler=token: most tokens decoded per device call (it also ends when an answer stops)")
flags.DEFINE_integer("prefill_chunk", 512, "--scheduler=token: longest prompt piece prefilled in one call")
flags.DEFINE_integer("seed", 0, "problem subsample, adapter init and sampling seed")
flags.DEFINE_string("run_dir", "runs/default", "output folder (resumable)")
flags.DEFINE_integer("problems_per_round", 0, "admit the problems in blocks of this many, every method on a "
                     "block before the next block (0 = one block), so that a study stopped at any point has every "
                     "method on nearly the same problems")
# devices and processes
flags.DEFINE_list("mesh", None, "DATA,MODEL: this process's device mesh, session slots split over DATA and "
                  "weights tensor-parallel over MODEL (default: every local device on DATA)")
flags.DEFINE_bool("distributed", False, "start jax.distributed; the three flags below default to what JAX "
                  "detects (TPU pod, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS)")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (implies --distributed)")
flags.DEFINE_integer("num_processes", None, "number of processes (implies --distributed)")
flags.DEFINE_integer("process_id", None, "this process's index (implies --distributed)")
# decoding
define_sampling_flags(max_new_tokens=256, temperature=0.7, top_p=0.8)
flags.DEFINE_integer("max_context", 512, "token budget per prompt + response; older turns are trimmed")
flags.DEFINE_enum("equivalence", "math-verify", list(EQUIVALENCES), "math answer equivalence")
flags.DEFINE_bool("boxed_only", True, "count only an answer in \\boxed{} (the paper's rule-based reward); "
                  "--noboxed_only also reads GSM8K's last number and a choice letter outside a box")
# weights stream
flags.DEFINE_enum("reward", "rule", list(REWARDS), "what the methods act on: the rule-based verifier, or `model`: "
                  "the text model (--text_model) judges each answer against the reference. Accuracy is always "
                  "the rule-based verifier's")
flags.DEFINE_float("beta", 1.0, "KL temperature β")
flags.DEFINE_enum("tilt", "token", list(TILTS), "sequence-to-token tilt (token = spec Option B, suffix = Option A)")
flags.DEFINE_enum("residual", "prob", list(RESIDUALS), "probability or centred-logit residual")
flags.DEFINE_enum("preset", "fast", list(PRESETS), "Weights stream preset: `paper` = the spec's step (q/v LoRA on "
                  "every layer, exact head metric, 10 CG iterations); `fast` = the measured cost/quality point "
                  "(BUILD_NOTES.md). --adapter, --lora_layers, --lora_targets, --head_top_k, --cg_iters, "
                  "--backtrack and --max_step_norm override it")
flags.DEFINE_enum("adapter", None, list(ADAPTERS), "what the Weights stream adapts: LoRA factors or an offset of "
                  "the final hidden state (default: the preset's)")
flags.DEFINE_string("lora_layers", None, "adapted layers: all, last:N or I-J (default: the preset's)")
flags.DEFINE_integer("head_top_k", None, "head metric inside CG on each row's top-k tokens plus its sampled one, "
                     "0 = exact over the vocabulary (default: the preset's)")
flags.DEFINE_integer("cg_iters", None, "CG iterations (default: the preset's)")
flags.DEFINE_integer("backtrack", None, "halve a step that raises KL(pi*||pi) up to this many times, else keep the "
                     "adapter; 0 = the plain step (default: the preset's)")
flags.DEFINE_float("damping", 1e-4, "λ relative to mean diag(JᵀJ)")
flags.DEFINE_float("max_step_norm", None, "trust region on ||Δθ|| (default: the preset's)")
flags.DEFINE_integer("lora_rank", 8, "LoRA rank")
flags.DEFINE_float("lora_alpha", 16.0, "LoRA alpha")
flags.DEFINE_list("lora_targets", None, "LoRA targets from q,k,v,o,gate,up,down (default: the preset's)")
flags.DEFINE_enum("remat", "auto", ["auto", "on", "off"], "recompute activations in the ROSA update (less memory, "
                  f"~20% slower); auto = on for a pass of more than {AUTO_STORED_TOKENS} tokens (sessions x row)")
flags.DEFINE_integer("update_batch", 1, "sessions per vmapped pass of a Weights step, passes one after another (0 = "
                     "the whole bucket at once: faster on an accelerator with memory to spare; on a CPU the same speed)")
# words stream
define_words_flags()
flags.DEFINE_integer("switch_turn", 5, "`switch`: turn from which the second axis is used")
flags.DEFINE_enum("switch_first", "words", ["words", "weights"], "`switch`: the axis used first")

flags.adopt_module_key_flags(common)  # config.json records the shared flags with this module's own

def weights_preset() -> WeightsPreset:
    """--preset, with each of its fields that has its own flag given on the command line overriding it."""
    fields = (f.name for f in dataclasses.fields(WeightsPreset))
    given = {name: getattr(FLAGS, name) for name in fields if getattr(FLAGS, name) is not None}
    return dataclasses.replace(PRESETS[FLAGS.preset], **given)


def engine_config(method: str, slots: int, num_layers: int) -> EngineConfig:
    preset = weights_preset()
    try:
        lora = preset.lora(num_layers, rank=FLAGS.lora_rank, alpha=FLAGS.lora_alpha)
    except ValueError as e:
        raise app.UsageError(f"--lora_layers / --lora_targets: {e}") from None
    return EngineConfig(
        method=method, max_turns=FLAGS.max_turns, slots=slots,
        sampling=sampling_from_flags(),
        rosa=preset.rosa(beta=FLAGS.beta, tilt=FLAGS.tilt, residual=FLAGS.residual, damping=FLAGS.damping,
                         remat=FLAGS.remat != "off", session_batch=FLAGS.update_batch,
                         store_up_to=AUTO_STORED_TOKENS if FLAGS.remat == "auto" else 0),
        lora=lora, adapter=preset.adapter,
        switch_turn=FLAGS.switch_turn, switch_first=FLAGS.switch_first, seed=FLAGS.seed,
        equivalence=FLAGS.equivalence, boxed_only=FLAGS.boxed_only, reward=FLAGS.reward,
        critic_tokens=FLAGS.critic_tokens, rewrite_tokens=FLAGS.rewrite_tokens, words_retries=FLAGS.words_retries,
        critic_reference=FLAGS.critic_reference, max_context=FLAGS.max_context,
        sessions=FLAGS.sessions, decode_steps=FLAGS.decode_steps, prefill_chunk=FLAGS.prefill_chunk)


# Flags that change how a run is scheduled or where it runs, never a problem's trajectory.
SCHEDULING_FLAGS = {"methods", "num_problems", "problems_per_round", "slots", "scheduler", "sessions", "update_batch",
                    "decode_steps", "prefill_chunk", "mesh", "distributed",
                    "coordinator_address", "num_processes", "process_id", "run_dir", "cache_dir"}


def check_same_config(path: Path, config: dict, defaults: dict) -> None:
    """Refuse to resume a run folder with settings that would change its trajectories (a flag absent from
    an older config.json is taken at its default, which is what that run used)."""
    if not path.exists():
        return
    before = json.loads(path.read_text())
    now = json.loads(json.dumps(config))  # as config.json holds it (tuples as lists)
    then = {k: before.get(k, json.loads(json.dumps(defaults.get(k)))) for k in now}
    changed = {k: (then[k], now[k]) for k in now if k not in SCHEDULING_FLAGS and then[k] != now[k]}
    if changed:
        listed = ", ".join(f"--{k}: {old!r} in the folder, {new!r} now" for k, (old, new) in sorted(changed.items()))
        raise app.UsageError(f"{path.parent} was run with other settings ({listed}); resuming would mix "
                             "trajectories. Rerun with the folder's settings (its config.json) or use a new --run_dir.")


def build_mesh() -> Mesh:
    local = jax.local_device_count()
    data, model = (local, 1) if not FLAGS.mesh else map(int, FLAGS.mesh)
    try:
        return make_mesh(data, model)
    except ValueError as e:
        raise app.UsageError(f"--mesh: {e}") from None


def run_sweep(run_dir: Path, info: ProcessInfo) -> dict | None:
    """Run this process's share; process 0 merges the records and writes the summary (returned)."""
    for m in FLAGS.methods:
        if m not in METHODS:
            raise app.UsageError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    mesh = build_mesh()
    run_dir.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        key_flags = FLAGS.get_key_flags_for_module(sys.modules[__name__])
        config = {f.name: f.value for f in key_flags} | {"sampler": SAMPLER, "words_stream": WORDS_STREAM}
        # A folder from before these were recorded drew over the whole vocabulary and rewrote the whole message.
        defaults = {f.name: f.default for f in key_flags} | {"sampler": "full-vocabulary", "words_stream": "rewrite"}
        check_same_config(run_dir / "config.json", config, defaults)
        (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    problems, report = load_problems(FLAGS.dataset, limit=FLAGS.num_problems or None, seed=FLAGS.seed,
                                     cache_dir=FLAGS.cache_dir)
    if report.skipped and info.is_main:
        logging.warning("%s: skipped %d malformed rows: %s", FLAGS.dataset, len(report.skipped), report.skipped[:5])
        print(f"skipped {len(report.skipped)} malformed rows of {FLAGS.dataset} (first: {report.skipped[0]})")
    own_records = records_path(run_dir, info)
    drop_torn_tail(own_records)
    # Every process reads the same files here (before anyone appends), so the shares are disjoint.
    done = {(r["method"], r["problem_id"]) for r in read_records(run_dir)}
    snapshots = {key: row for key, row in read_in_flight(run_dir).items() if key not in done}
    barrier("records read")
    todo = {m: share([p for p in problems if (m, p.id) not in done], info) for m in FLAGS.methods}
    # One engine runs every method: its rows hold sessions of several methods at once, so that no method's
    # last sessions decode alone. Blocks only order the admissions.
    block = FLAGS.problems_per_round or len(problems)
    block_of = {p.id: k // block for k, p in enumerate(problems)}
    work = sorted(((m, p) for m in FLAGS.methods for p in todo[m]), key=lambda mp: block_of[mp[1].id])
    # The sessions a stopped run left in flight go first, from their last finished turn.
    restored = [Session.from_snapshot(snapshots[m, p.id], p) for m, p in work if (m, p.id) in snapshots]
    work = restored + [(m, p) for m, p in work if (m, p.id) not in snapshots]
    total = len(work)
    if done:
        print(f"resuming {run_dir}: {len(done)} problem runs already finished")
    if restored:
        print(f"restoring {len(restored)} sessions in flight after {sum(s.turn for s in restored)} finished turns")
    if info.count > 1:
        print(f"process {info.index} of {info.count}: {total} problem runs to do", flush=True)
    model = model_from_flags(mesh)
    if FLAGS.text_model == "rule" and FLAGS.reward == "model":
        raise app.UsageError("--reward=model needs a text model that can judge: --text_model=local[:spec] or openai")
    text_model = common.text_model_from_flags(model, mesh)
    data_size = mesh.shape["data"]
    start = time.time()
    with open(own_records, "a") as out, tqdm(total=total, desc="problems", unit="problem",
                                             position=info.index if info.count > 1 else None) as bar:
        if work:
            # A problem's trajectory does not depend on its slot, so small runs use only the slots they fill
            # (rounded up to split evenly over the mesh's data axis).
            slots = -(-min(FLAGS.slots, len(work)) // data_size) * data_size
            first_method = method_of(work[0])
            # The adapters of sessions in flight, for a restart on this machine (not committed: a restore
            # elsewhere runs their Weights steps again from in_flight.jsonl).
            engine = SCHEDULERS[FLAGS.scheduler](model, engine_config(first_method, slots, model.cfg.num_layers),
                                                 text_model, adapter_cache=run_dir / ADAPTER_CACHE)
            own_in_flight = in_flight_path(run_dir, info)
            in_flight = {(s.method, s.problem.id): snapshots[s.method, s.problem.id] for s in restored}
            write_in_flight(own_in_flight, in_flight.values())  # this process's share, the rest dropped

            def ready(session: Session):
                in_flight[session.method, session.problem.id] = session.snapshot()
                write_in_flight(own_in_flight, in_flight.values())

            def finish(session: Session):
                out.write(json.dumps(session.record(FLAGS.dataset).to_json()) + "\n")
                out.flush()
                if in_flight.pop((session.method, session.problem.id), None) is not None:
                    write_in_flight(own_in_flight, in_flight.values())
                bar.update(1)
                bar.set_postfix(method=session.method)
                if isinstance(engine, TokenEngine) and bar.n % 16 == 0:  # where the time went so far
                    bar.write(f"after {bar.n} problems: {engine.stats}")

            def drain(signum, frame):
                engine.stop_admitting()
                bar.write(f"{signal.Signals(signum).name}: finishing the sessions in flight and admitting no more")

            # `kill -USR1 <pid>` ends a run without losing a turn; a kill loses the turns in progress (their
            # sessions go on from the last finished turn).
            previous = signal.signal(signal.SIGUSR1, drain)
            try:
                engine.run(work, finish, ready)
            finally:
                signal.signal(signal.SIGUSR1, previous)
                engine.close()
            if not engine.admitting:
                bar.write(f"stopped early: {len(engine.queue)} problem runs were not admitted "
                          "(rerun the same command to do them)")
            if isinstance(engine, TokenEngine):
                bar.write(f"all {bar.n} problems: {engine.stats}")
    wall = time.time() - start
    barrier("sweep finished")
    if not info.is_main:
        return None
    all_records = merge_records(run_dir)
    finished_now = len(all_records) - len(done)  # by every process
    wanted = {p.id for p in problems}
    records = [r for r in all_records if r["method"] in FLAGS.methods and r["problem_id"] in wanted]
    meta = {"wall_seconds_this_run": wall, "problems_per_hour_this_run": 3600 * finished_now / max(wall, 1e-9),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "processes": info.count, "mesh": dict(mesh.shape), "devices": [str(d) for d in jax.devices()],
            "model": FLAGS.model, "dataset": FLAGS.dataset,
            "text_model": text_model.name if text_model else None, "dataset_skipped_rows": len(report.skipped)}
    summary, md = write_report(run_dir, records, FLAGS.max_turns, meta, {p.id: p.question for p in problems})
    print(md)
    print(f"\nwall {wall:.0f} s this run, peak RSS {meta['peak_rss_gib']:.1f} GiB (process 0); "
          f"records in {run_dir / RECORDS}")
    return summary


def main(_):
    logging.set_verbosity(logging.WARNING)
    common.keep_compiled_programs()
    wants_distributed = FLAGS.distributed or any(
        v is not None for v in (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id))
    info = (initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id) if wants_distributed
            else process_info())
    run_dir = Path(FLAGS.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = lock_run(run_dir, info)
    except RunInUse as e:
        raise app.UsageError(str(e)) from None
    with lock:
        run_sweep(run_dir, info)


if __name__ == "__main__":
    app.run(main)
