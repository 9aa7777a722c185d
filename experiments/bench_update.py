"""ROSA update cost and quality on a real model, against the exact paper step on the same sessions.

    python -m experiments.bench_update --model=qwen2.5-coder-0.5b-instruct --sessions=8 \
        --variants=paper,fast,L4,k64,fast-cg2,fast-cg8,hidden

Sessions are real turns: GSM8K questions rendered with the model's chat template (left-padded to
--history_len), answered by the model itself with the sweep's decoding for exactly --response_len tokens
(stop tokens ignored, so every session has the same number of Jacobian rows), then judged wrong (r = -1).
For each variant and S: seconds per session of the update (compiled ahead of time, so compilation is
not counted), update time / the generation time of the same turn (decoded with --decode_dtype), XLA's peak
temporary memory, KL(pi*||pi) after / before, the drop of the failed response's mean token log-prob, and, when
`paper` runs or --reference gives it, these against the `paper` variant on the same sessions and the cosine
between the two Δθ (variants that adapt the same parameters as `paper`).

A variant is a preset name (`paper`, `fast`) optionally followed by overrides joined with `-`:
`L<N>` the last N layers (`all` every layer), `k<K>` the head metric's top-k (`k0` exact), `cg<N>`
CG iterations, `bt<N>` backtracking halvings, `tr<X>` the trust region on ||Δθ||, `linear` LoRA on every
linear layer (not only q, v), `nr` activations stored instead of recomputed (--noremat for one variant),
`pb<N>` the sessions solved in passes of N (the sweep's --update_batch), `bf16` the trunk's matmuls in bfloat16
(float32 sums), `hidden` the hidden-state offset.
`L4` = paper with LoRA on the last 4 layers only; `fast-pb1-nr` = the sweep's step on a short history.

`--profile` traces each update once more and splits its time by the decoder's named scopes (q/k/v, attention, output
projection, MLP; the head and the solver are "other") and by pass (forward, JVP, VJP): the profile in BUILD_NOTES.md,
"The Weights step".
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.flatten_util import ravel_pytree

from experiments.common import best_time, define_model_flags, gsm8k_prompts, model_from_flags, traced_op_seconds
from rosa2_jax.adapt.rosa import UpdateBatch, hidden_offset_update, rosa_update
from rosa2_jax.engine import PRESETS, WeightsPreset
from rosa2_jax.engine.streams import HIDDEN_OFFSET_TOP_K
from rosa2_jax.model.generation import SamplingConfig, generate_padded, left_pad
from rosa2_jax.model.lora import LORA_TARGETS, init_adapters

FLAGS = flags.FLAGS
define_model_flags()
flags.DEFINE_list("sessions", ["1", "8"], "session counts S")
flags.DEFINE_list("variants", ["paper", "fast"], "update variants (module doc); `paper` is the quality reference "
                  "(without it or --reference, a timing-only run)")
flags.DEFINE_integer("history_len", 128, "history tokens before the response (prompts are left-padded to it)")
flags.DEFINE_integer("response_len", 512, "response tokens (rows of the Jacobian)")
flags.DEFINE_float("temperature", 0.7, "decoding temperature of the generated responses")
flags.DEFINE_float("top_p", 0.8, "decoding nucleus mass")
flags.DEFINE_bool("remat", True, "recompute layer activations in the JVP/VJP (False stores them: faster, more memory)")
flags.DEFINE_list("memory_response_lens", [], "T values for a memory sweep of the last variant at S=1")
flags.DEFINE_string("out", "runs/bench_update.json", "where to write the measurements")
flags.DEFINE_bool("profile", False, "also trace each update once and split its time by layer part (named scopes of "
                  "model/decoder.py) and pass (forward, JVP, VJP)")
flags.DEFINE_string("reference", None, "an earlier --out of the same model and sizes: its `paper` rows (per session) "
                    "are the reference, so the 25-minute paper step is not rerun (the sessions are checked to be "
                    "the same)")


def parse_variant(name: str) -> tuple[WeightsPreset, dict]:
    """(preset, RosaConfig fields outside the preset) of a variant name."""
    base, *overrides = name.split("-")
    if base not in PRESETS:
        base, overrides = "paper", [base] + overrides
    preset, solver = PRESETS[base], {"remat": FLAGS.remat}
    for o in overrides:
        if o == "nr":
            solver["remat"] = False
        elif o == "bf16":
            preset = dataclasses.replace(preset, trunk_dtype="bfloat16")
        elif o[:2] == "pb" and o[2:].isdigit():
            solver["session_batch"] = int(o[2:])
        elif o == "linear":
            preset = dataclasses.replace(preset, lora_targets=LORA_TARGETS)
        elif o == "hidden":
            preset = dataclasses.replace(preset, adapter="hidden")
        elif o == "all":
            preset = dataclasses.replace(preset, lora_layers="all")
        elif o[:1] == "L" and o[1:].isdigit():
            preset = dataclasses.replace(preset, lora_layers=f"last:{o[1:]}")
        elif o[:1] == "k" and o[1:].isdigit():
            preset = dataclasses.replace(preset, head_top_k=int(o[1:]))
        elif o[:2] == "cg" and o[2:].isdigit():
            preset = dataclasses.replace(preset, cg_iters=int(o[2:]))
        elif o[:2] == "bt" and o[2:].isdigit():
            preset = dataclasses.replace(preset, backtrack=int(o[2:]))
        elif o[:2] == "tr" and o[2:].replace(".", "", 1).isdigit():
            preset = dataclasses.replace(preset, max_step_norm=float(o[2:]))
        else:
            raise app.UsageError(f"variant {name!r}: unknown part {o!r} (see the module doc)")
    return preset, solver


def timed_compiled(jitted, *args, traced: bool = False, **static):
    """(compiled call, seconds of one call, its output): compiled ahead of time so that the time is the run's
    alone. `traced`: one more call is traced and its split printed."""
    compiled = jitted.lower(*args, **static).compile()
    out = None

    def call():
        nonlocal out
        out = jax.block_until_ready(compiled(*args))

    seconds = best_time(call, repeats=1)
    if traced:
        print_profile(*traced_op_seconds(call, compiled.as_text(), update_part))
    return compiled, seconds, out


def update_part(op_name: str) -> str:
    """An update's op by the decoder's named scope it runs in and by pass: the forward, the JVP (jax.linearize's
    tangents) or the VJP (their transpose). The head, the solver and the layer norms outside a scope are "other"."""
    scope = next((s for s in ("qkv", "attention", "out_proj", "mlp") if f"/{s}/" in op_name), "other")
    return f"{scope}, {'VJP' if 'transpose(' in op_name else 'JVP' if 'jvp(' in op_name else 'forward'}"


def print_profile(spent: list[tuple[str, float]], wall: float) -> None:
    traced = sum(seconds for _, seconds in spent)
    print(f"\nprofile of one update call ({wall:.1f} s wall, {traced:.1f} s of traced ops):\n| part | s | share |\n"
          "|---|---|---|\n" + "".join(f"| {part} | {seconds:.2f} | {seconds / traced:.0%} |\n"
                                      for part, seconds in spent), flush=True)


def run_variant(model, preset: WeightsPreset, solver: dict, batch: UpdateBatch, S: int):
    cfg, params = model.cfg, model.params
    rosa = preset.rosa(**solver)
    if preset.adapter == "hidden":
        theta = jnp.zeros((S, cfg.hidden_size), jnp.float32)
        compiled, seconds, (new, stats) = timed_compiled(
            hidden_offset_update, params, theta, batch, traced=FLAGS.profile, cfg=cfg, rosa=rosa,
            top_k=preset.head_top_k or HIDDEN_OFFSET_TOP_K)
        deltas = None
    else:
        theta = init_adapters(cfg, preset.lora(cfg.num_layers), S, jax.random.key(0))  # A as `paper`'s
        compiled, seconds, (new, stats) = timed_compiled(rosa_update, params, theta, batch, traced=FLAGS.profile,
                                                          cfg=cfg, rosa=rosa)
        deltas = [np.asarray(ravel_pytree(jax.tree.map(lambda a, b: a[s] - b[s], new.factors, theta.factors))[0])
                  for s in range(S)]
    return seconds, int(compiled.memory_analysis().temp_size_in_bytes), jax.device_get(stats), deltas


PER_SESSION = ("kl_before", "kl_after", "logp_before", "logp_after", "step_norm_sq")


def quality(stats, deltas, ref: dict | None, ref_deltas) -> dict:
    """Figures of one variant; `ref` holds the paper step's PER_SESSION arrays on the same sessions (None: no
    figures against it)."""
    kl_drop = stats.kl_before - stats.kl_after
    lp_drop = stats.logp_before - stats.logp_after
    out = {"kl_after_over_before": float(np.mean(stats.kl_after / stats.kl_before)),
           "logp_drop": float(np.mean(lp_drop)),
           "step_norm_sq": float(np.mean(stats.step_norm_sq)),
           "backtracked": int(np.sum(stats.backtracks > 0)), "rejected": int(np.sum(stats.rejected)),
           "cg_iters": float(np.mean(stats.cg_iters))}
    if ref is not None:
        out["kl_reduction_vs_paper"] = float(np.sum(kl_drop) / np.sum(ref["kl_before"] - ref["kl_after"]))
        out["logp_drop_vs_paper"] = float(np.sum(lp_drop) / np.sum(ref["logp_before"] - ref["logp_after"]))
    if deltas is not None and ref_deltas is not None:
        out["cosine_vs_paper"] = float(np.mean([d @ r / max(np.linalg.norm(d) * np.linalg.norm(r), 1e-30)
                                                for d, r in zip(deltas, ref_deltas)]))
    return out


def main(_):
    logging.set_verbosity(logging.WARNING)
    model = model_from_flags()
    cfg, params = model.cfg, model.params
    H, T = FLAGS.history_len, FLAGS.response_len
    references = {}
    if FLAGS.reference:
        earlier = json.loads(Path(FLAGS.reference).read_text())
        references = {r["sessions"]: {k: np.asarray(v) for k, v in r["per_session"].items()}
                      for r in earlier["rows"] if r["variant"] == "paper"}
    variants = {v: parse_variant(v) for v in sorted(FLAGS.variants, key=lambda v: v != "paper")}
    sessions = sorted(map(int, FLAGS.sessions))
    prompts = gsm8k_prompts(model, max(sessions), H)
    pad = model.sampler.pad_id
    sampling = SamplingConfig(max_new_tokens=T, temperature=FLAGS.temperature, top_p=FLAGS.top_p)
    print(f"model {FLAGS.model}; history {H} (real GSM8K prompts, mean {np.mean([len(p) for p in prompts]):.0f} "
          f"tokens), response {T}; remat {FLAGS.remat}; devices {jax.devices()}")
    print("| S | variant | s/session | update / generation | peak temp | KL after/before | KL drop vs paper | "
          "log-prob drop | vs paper | cosine Δθ vs paper | ||Δθ||² | backtracked / rejected |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for S in sessions:
        tokens, valid = left_pad(prompts[:S], H, pad)
        keys = jax.vmap(jax.random.key)(jnp.arange(S, dtype=jnp.uint32))
        _, gen_s, (out, _, _) = timed_compiled(generate_padded, model.sampler.decode_params, jnp.asarray(tokens),
                                               jnp.asarray(valid), keys, None, None, cfg=cfg, sampling=sampling,
                                               stop_ids=(), pad_id=pad)
        batch = UpdateBatch(jnp.concatenate([jnp.asarray(tokens), out], 1),
                            jnp.concatenate([jnp.asarray(valid), jnp.ones(out.shape, bool)], 1),
                            jnp.full((S,), T, jnp.int32), jnp.full((S,), -1.0, jnp.float32), jnp.ones((S,), bool),
                            window=T)
        ref, ref_deltas = references.get(S), None
        for name, (preset, solver) in variants.items():
            if name == "paper" and ref is not None:
                continue
            seconds, mem, stats, deltas = run_variant(model, preset, solver, batch, S)
            per_session = {k: np.asarray(getattr(stats, k)).tolist() for k in PER_SESSION}
            if name == "paper":
                ref, ref_deltas = {k: np.asarray(v) for k, v in per_session.items()}, deltas
            elif ref is not None and not np.allclose(stats.kl_before, ref["kl_before"], rtol=1e-3):
                raise app.UsageError(f"--reference: its sessions differ from these (KL before {ref['kl_before']} "
                                     f"against {stats.kl_before}); rerun the paper step")
            same = preset.adapter == "lora" and (preset.lora_layers, preset.lora_targets) == ("all", ("q", "v"))
            q = quality(stats, deltas if same else None, ref, ref_deltas)
            row = {"sessions": S, "variant": name, "preset": dataclasses.asdict(preset), **solver,
                   "s_per_session": seconds / S,
                   "generation_s": gen_s, "update_over_generation": seconds / gen_s, "peak_temp_bytes": mem,
                   "per_session": per_session} | q
            rows.append(row)
            vs = {k: f"{q[k]:.{d}f}" if k in q else "n/a" for k, d in
                  (("kl_reduction_vs_paper", 2), ("logp_drop_vs_paper", 2), ("cosine_vs_paper", 3))}
            print(f"| {S} | {name} | {seconds / S:.2f} | {seconds / gen_s:.2f} | {mem / 2**30:.2f} GiB | "
                  f"{q['kl_after_over_before']:.3f} | {vs['kl_reduction_vs_paper']} | {q['logp_drop']:.4f} | "
                  f"{vs['logp_drop_vs_paper']} | {vs['cosine_vs_paper']} | {q['step_norm_sq']:.3g} | "
                  f"{q['backtracked']} / {q['rejected']} |", flush=True)
        print(f"(S={S}: generating the turn took {gen_s:.1f} s)", flush=True)
    mem_rows = []
    if FLAGS.memory_response_lens:
        name, (preset, solver) = list(variants.items())[-1]
        print(f"\nmemory against response length, {name}, S=1: | T | peak temp | T x V x 4 bytes |")
        for t_len in map(int, FLAGS.memory_response_lens):
            toks = jnp.asarray(np.random.RandomState(0).randint(100, cfg.vocab_size, (1, H + t_len)), jnp.int32)
            b = UpdateBatch(toks, jnp.ones(toks.shape, bool), jnp.full((1,), t_len, jnp.int32),
                            jnp.full((1,), -1.0, jnp.float32), jnp.ones((1,), bool), window=t_len)
            rosa = preset.rosa(**solver)
            ad = init_adapters(cfg, preset.lora(cfg.num_layers), 1, jax.random.key(0))
            mem = int(rosa_update.lower(params, ad, b, cfg=cfg, rosa=rosa).compile().memory_analysis().temp_size_in_bytes)
            mem_rows.append({"response_len": t_len, "peak_temp_bytes": mem, "full_probs_bytes": t_len * cfg.vocab_size * 4})
            print(f"| {t_len} | {mem / 2**20:.0f} MiB | {t_len * cfg.vocab_size * 4 / 2**20:.0f} MiB |", flush=True)
    out_path = Path(FLAGS.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"model": FLAGS.model, "history_len": H, "response_len": T, "rows": rows,
                                    "memory": mem_rows}, indent=2))


if __name__ == "__main__":
    app.run(main)
