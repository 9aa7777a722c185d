"""ROSA update cost on a real model: batched (vmapped) against a loop of single sessions.

    python -m experiments.bench_update --sessions=1,8,32 --history_len=128 --response_len=256

For each S: seconds per session of the vmapped update over S failing sessions, against one session at a
time; XLA's peak temporary memory of the compiled update; and the update time as a fraction of generating
the same responses. --memory_response_lens varies T at S=1 to show memory growing with T·d, not T·V.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments.common import best_time
from rosa2_jax.checkpoint import load_model
from rosa2_jax.generation import SamplingConfig, generate
from rosa2_jax.lora import LoraConfig, init_adapters
from rosa2_jax.rosa import RosaConfig, UpdateBatch, rosa_update

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct", "built-in name, folder, GGUF file or hub id")
flags.DEFINE_list("sessions", ["1", "8", "32"], "session counts S")
flags.DEFINE_integer("history_len", 128, "history tokens before the response")
flags.DEFINE_integer("response_len", 256, "response tokens (rows of the Jacobian)")
flags.DEFINE_list("memory_response_lens", ["64", "128", "256", "512"], "T values for the memory sweep (S=1)")
flags.DEFINE_integer("loop_sessions", 2, "single-session updates timed for the loop baseline")
flags.DEFINE_integer("cg_iters", 10, "CG iterations")
flags.DEFINE_bool("remat", True, "recompute layer activations in the JVP/VJP (False stores them: faster, more memory)")
flags.DEFINE_string("out", "runs/bench_update.json", "where to write the measurements")


def make_batch(rng, cfg, sessions: int, history: int, response: int) -> UpdateBatch:
    tokens = rng.randint(100, cfg.vocab_size, (sessions, history + response)).astype(np.int32)
    return UpdateBatch(jnp.asarray(tokens), jnp.ones(tokens.shape, bool), jnp.full((sessions,), response, jnp.int32),
                       jnp.full((sessions,), -1.0, jnp.float32), jnp.ones((sessions,), bool), window=response)


def peak_temp_bytes(params, adapters, batch, cfg, rosa) -> int:
    compiled = rosa_update.lower(params, adapters, batch, cfg=cfg, rosa=rosa).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main(_):
    logging.set_verbosity(logging.WARNING)
    model = load_model(FLAGS.model)
    cfg, params = model.cfg, model.params
    rosa = RosaConfig(cg_iters=FLAGS.cg_iters, remat=FLAGS.remat)
    lora = LoraConfig()
    rng = np.random.RandomState(0)
    H, T = FLAGS.history_len, FLAGS.response_len

    def run(adapters, batch):
        new, stats = rosa_update(params, adapters, batch, cfg=cfg, rosa=rosa)
        jax.block_until_ready(new.factors)
        return stats

    one = init_adapters(cfg, lora, 1, jax.random.key(0))
    one_batch = make_batch(rng, cfg, 1, H, T)
    stats = run(one, one_batch)  # compile
    loop_s = best_time(lambda: [run(one, one_batch) for _ in range(FLAGS.loop_sessions)], repeats=1)
    loop_per_session = loop_s / FLAGS.loop_sessions
    print(f"model {FLAGS.model}; history {H}, response {T}; LoRA r={lora.rank} {lora.targets}; "
          f"CG {rosa.cg_iters} iters (ran {int(stats.cg_iters[0])}); remat {rosa.remat}; devices {jax.devices()}")
    print(f"loop: {loop_per_session:.2f} s per session")
    print("| S | batched s/session | loop s/session | speed-up | peak temp memory | generation s (same turn) | update / generation |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for S in map(int, FLAGS.sessions):
        adapters = init_adapters(cfg, lora, S, jax.random.key(1))
        batch = make_batch(rng, cfg, S, H, T)
        run(adapters, batch)
        t = best_time(lambda: run(adapters, batch), repeats=1)
        mem = peak_temp_bytes(params, adapters, batch, cfg, rosa)
        prompts = np.asarray(batch.tokens[:, :H]).tolist()
        sampling = SamplingConfig(max_new_tokens=T)
        generate(params, cfg, prompts, sampling, stop_token_ids=[], pad_id=0)
        start = time.perf_counter()
        generate(params, cfg, prompts, sampling, stop_token_ids=[], pad_id=0)
        gen_s = time.perf_counter() - start
        row = {"sessions": S, "batched_s_per_session": t / S, "loop_s_per_session": loop_per_session,
               "speedup": loop_per_session / (t / S), "peak_temp_bytes": mem, "generation_s": gen_s,
               "update_over_generation": t / gen_s}
        rows.append(row)
        print(f"| {S} | {t / S:.2f} | {loop_per_session:.2f} | {row['speedup']:.2f}x | {mem / 2**30:.2f} GiB | "
              f"{gen_s:.1f} | {t / gen_s:.2f} |", flush=True)
    print("\nmemory against response length (S=1): | T | peak temp | T x V x 4 bytes |")
    mem_rows = []
    for t_len in map(int, FLAGS.memory_response_lens):
        b = make_batch(rng, cfg, 1, H, t_len)
        mem = peak_temp_bytes(params, one, b, cfg, rosa)
        mem_rows.append({"response_len": t_len, "peak_temp_bytes": mem, "full_probs_bytes": t_len * cfg.vocab_size * 4})
        print(f"| {t_len} | {mem / 2**20:.0f} MiB | {t_len * cfg.vocab_size * 4 / 2**20:.0f} MiB |", flush=True)
    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": FLAGS.model, "history_len": H, "response_len": T, "rows": rows,
                               "memory": mem_rows}, indent=2))


if __name__ == "__main__":
    app.run(main)
