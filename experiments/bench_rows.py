"""Cost of the token engine's two device calls against what this machine allows: prefilling a prompt piece into
one row, by piece length, and one decode step of every row, by row count and cache capacity, next to the decode
step's roofline from the machine's matmul rate and read bandwidth measured in the same run.

    python -m experiments.bench_rows --model=qwen2.5-coder-0.5b-instruct --rows=16,32 --pieces=16,64
    python -m experiments.bench_rows --model=qwen2.5-coder-0.5b-instruct --rows=16 --pieces= --profile

`--profile` traces decode calls of the first row count with jax.profiler and splits the step's time by what each
XLA op computes (the named scopes of model/decoder.py and model/decode_rows.py), with the host's share.

The decode figures are per step of a `--decode_steps` call, sampled as the sweep does (T = 0.7, top-p 0.8), with
every row answering its own GSM8K question (prefilled in the chat template, then decoding from call to call). The
roofline (experiments.common.decode_roofline) reads every weight and the rows' keys/values (their mean length over
the calls) once and does every multiply-add once, at the fastest matmul rate measured (XLA's float32 or bfloat16,
or the matmul kernel's, AMX or FMA, where decoding runs on one); `fraction` is roofline time / measured time, and
the last column the same at XLA's rate alone (the roofline before the matmul kernels). Decode calls attend as the
token engine does: on the attention kernel where it runs (`ROSA2_JAX_ATTENTION=off` for XLA's attention); with
`--capacities` larger than the rows' prompts, a row's valid slots are a part of the cache, as beside a longer row
in the engine.

`--refreshed` times the first prefill of a turn after a Weights step: the session's held cache with its adapted
layers computed again from the inputs the step computed, against the whole prompt prefilled again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.common import (best_time, decode_roofline, define_model_flags, gsm8k_prompts, matmul_peak_flops,
                                model_from_flags, prefilled_rows, read_bandwidth, traced_op_seconds)
from rosa2_jax.kernels.decode_attention import attention_kernel_supported, attention_simd
from rosa2_jax.kernels.top_k import top_k_kernel_supported, top_k_simd
from rosa2_jax.model.decode_rows import decode_chunk, empty_rows, prefill_row, row_cache
from rosa2_jax.model.decoder import PACKINGS, cache_dtype, decoder_hidden
from rosa2_jax.model.generation import SamplingConfig, bucket_length

FLAGS = flags.FLAGS
define_model_flags()
flags.DEFINE_list("rows", ["8"], "decode batches to time (the prefill uses the first)")
flags.DEFINE_list("pieces", ["16", "64", "192"], "prefill piece lengths (none: --pieces=)")
flags.DEFINE_list("capacities", [], "cache slots per row for the decode step (default: as the token engine sizes "
                  "the cache for the rows)")
flags.DEFINE_integer("prefix", 200, "cached tokens before a prefill piece")
flags.DEFINE_list("refreshed", ["1024"], "held prefixes (tokens) whose top `--adapted_layers` layers a turn after a "
                  "Weights step computes again, timed against prefilling the turn whole (none: --refreshed=)")
flags.DEFINE_integer("adapted_layers", 8, "layers a Weights step adapts (the fast preset's last:8)")
flags.DEFINE_integer("decode_steps", 16, "decode steps per call")
flags.DEFINE_bool("profile", False, "also trace decode calls and split a step's time by what it computes")

SAMPLING = SamplingConfig(max_new_tokens=512, temperature=0.7, top_p=0.8)
TIMED_CALLS = 8  # decode calls a row size runs: a warm-up, best of three, three traced


def decode_rows_call(model, rows: int, capacity: int | None, steps: int):
    """(a decode call of `steps` steps over `rows` rows, the HLO text it runs, the rows' mean cached length over the
    calls to come, the cache's slots). Each row holds a different GSM8K question in the chat template and keeps
    answering it from call to call (no stop token), so logits, nuclei and attention are those of real text. The
    cache is sized as the token engine sizes it (its longest row plus what the calls will add, bucketed) unless
    `capacity` is given."""
    cfg, params = model.cfg, model.sampler.decode_params
    prompts = gsm8k_prompts(model, rows, max_tokens=256)
    added = TIMED_CALLS * steps
    capacity = capacity or bucket_length(max(map(len, prompts)) + added + 1)
    state = prefilled_rows(params, cfg, prompts, capacity, SAMPLING.max_new_tokens, cache_dtype(params), pad_id=0)
    sessions = jnp.zeros(rows, jnp.int32)
    compiled = decode_chunk.lower(params, state, None, None, sessions, cfg=cfg, sampling=SAMPLING, stop_ids=(-1,),
                                  pad_id=0, steps=steps,
                                  attention_kernel=attention_kernel_supported(model.mesh),
                                  top_k_kernel=top_k_kernel_supported(model.mesh)).compile()

    def decode():
        nonlocal state
        state, _, ran = compiled(params, state, None, None, sessions)
        jax.block_until_ready(ran)

    return decode, compiled.as_text(), float(np.mean([len(p) for p in prompts])) + added / 2, capacity


# What an op computes, from the named scopes in its op_name (first match wins).
CATEGORIES = (("sampling", "/sampling/"), ("LM head", "/lm_head/"), ("cache write", "/cache_write/"),
              ("attention over the cache", "/attention/"), ("q/k/v projections, norms, RoPE", "/qkv/"),
              ("output projection", "/out_proj/"), ("MLP", "/mlp/"),
              ("layer slices (scan)", "dynamic_slice"))


def profile_decode(decode, hlo: str, steps: int, calls: int = 3) -> list[tuple[str, float]]:
    """(part, ms per step) of the traced calls; `host and gaps` is the wall time that no op covers (dispatch,
    argument handling, threads waiting)."""
    spent, wall = traced_op_seconds(decode, hlo, lambda op: next((c for c, key in CATEGORIES if key in op),
                                                                 "other ops"), calls)
    per_step = 1000 / (calls * steps)
    return [(label, seconds * per_step) for label, seconds in spent] + [
        ("host and gaps", max(wall - sum(s for _, s in spent), 0.0) * per_step)]


def main(_):
    model = model_from_flags()
    cfg, params = model.cfg, model.sampler.decode_params
    matmul_dtype = next(w.dtype for w in jax.tree.leaves(params["layers"]) if w.ndim >= 2)
    # The largest rate is what the machine allows: XLA CPU's large bfloat16 matmul can run below float32's, and
    # where decoding runs on a matmul kernel (AMX or FMA), its rate counts too.
    rates = {dtype.name: matmul_peak_flops(dtype=dtype)
             for dtype in dict.fromkeys((jnp.dtype(jnp.float32), matmul_dtype))}
    packing = next((p for p in PACKINGS if any(name.endswith(f"_{p}") for name in params["layers"][0])), None)
    if packing:
        rates[f"bfloat16 {packing} kernel"] = matmul_peak_flops(packing=packing)
    peak, bandwidth = max(rates.values()), read_bandwidth()
    xla_peak = max(r for name, r in rates.items() if "kernel" not in name)
    print("machine: matmul (2048^2, jitted) " + ", ".join(f"{d} {r / 1e9:.0f}" for d, r in rates.items())
          + f" GFLOP/s, read bandwidth {bandwidth / 1e9:.1f} GB/s; kernels: matmul {packing or 'off'}, attention "
          + f"{attention_simd() if attention_kernel_supported(model.mesh) else 'off'}, top-k "
          + f"{top_k_simd() if top_k_kernel_supported(model.mesh) else 'off'}")
    key = jax.random.key(0)
    pieces = list(map(int, FLAGS.pieces))
    rows = empty_rows(cfg, int(FLAGS.rows[0]), bucket_length(FLAGS.prefix + max(pieces, default=0)),
                      SAMPLING.max_new_tokens, cache_dtype(params), pad_id=0)
    prefix = list(range(100, 100 + FLAGS.prefix))
    if prefix:
        rows = prefill_row(params, rows, 0, prefix, key, cfg=cfg, pad_id=0)
    held = row_cache(rows, jnp.int32(0)) if prefix else None
    for n in pieces:
        prompt = prefix + list(range(1000, 1000 + n))

        def prefill():
            nonlocal rows
            rows = prefill_row(params, rows, 0, prompt, key, cfg=cfg, pad_id=0, prefix=held, reuse=len(prefix))
            jax.block_until_ready(rows.length)

        prefill()
        print(f"prefill {n:5d} tokens  {1000 * best_time(prefill):8.1f} ms", flush=True)

    first = cfg.num_layers - FLAGS.adapted_layers
    for n in map(int, FLAGS.refreshed):
        held_prompt = [100 + t % 5000 for t in range(n)]
        prompt = held_prompt + list(range(1000, 1064))  # the next user message
        rows = empty_rows(cfg, 1, bucket_length(len(prompt)), SAMPLING.max_new_tokens, cache_dtype(params), pad_id=0)
        rows = prefill_row(params, rows, 0, held_prompt, key, cfg=cfg, pad_id=0)
        held = row_cache(rows, jnp.int32(0))
        inputs, _ = decoder_hidden(model.params, jnp.asarray(held_prompt)[None], jnp.arange(n)[None],
                                   jnp.ones((1, n), bool), cfg=cfg, layers=(0, first), final_norm=False)
        timed = {}
        for label, kwargs in (("whole", {}), ("refreshed", dict(prefix=held, reuse=n, refresh=inputs[0],
                                                                 first_layer=first))):
            def turn():
                nonlocal rows
                rows = prefill_row(params, rows, 0, prompt, key, cfg=cfg, pad_id=0, **kwargs)
                jax.block_until_ready(rows.length)

            turn()
            timed[label] = best_time(turn)
        print(f"turn after a Weights step on the top {FLAGS.adapted_layers} layers, {n} held + 64 new tokens: "
              f"prefilled whole {1000 * timed['whole']:.0f} ms, held layers kept {1000 * timed['refreshed']:.0f} ms "
              f"({timed['whole'] / timed['refreshed']:.2f}x)", flush=True)

    print("| rows | slots | ms per step | tokens/s | roofline ms | bound | fraction of roofline | at XLA's matmul rate |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in map(int, FLAGS.rows):
        for capacity in list(map(int, FLAGS.capacities)) or [None]:
            decode, hlo, context, slots = decode_rows_call(model, batch, capacity, FLAGS.decode_steps)
            decode()
            step = best_time(decode) / FLAGS.decode_steps
            roof = decode_roofline(cfg, params, batch, context, peak, bandwidth)
            xla_roof = decode_roofline(cfg, params, batch, context, xla_peak, bandwidth)
            print(f"| {batch} | {slots} | {1000 * step:.1f} | {batch / step:.0f} | {1000 * roof.seconds:.1f} | "
                  f"{roof.bound} | {roof.seconds / step:.2f} | {xla_roof.seconds / step:.2f} |", flush=True)
            if FLAGS.profile and batch == int(FLAGS.rows[0]):
                shares = profile_decode(decode, hlo, FLAGS.decode_steps)
                total = sum(ms for _, ms in shares)
                print(f"\nprofile of a decode step, {batch} rows x {slots} slots (traced; {total:.1f} ms a step):")
                print("| part | ms per step | share |\n|---|---|---|")
                for label, ms in shares:
                    print(f"| {label} | {ms:.1f} | {ms / total:.0%} |")
                print(flush=True)


if __name__ == "__main__":
    app.run(main)
