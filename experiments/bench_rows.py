"""Cost of the token engine's two device calls: prefilling a prompt piece into one row, by piece length, and
one decode step of every row, by the rows' cache capacity.

    python -m experiments.bench_rows --model=qwen2.5-coder-0.5b-instruct --rows=8 --pieces=16,32,64,128,192

The prefill cost per piece length says what padding a piece to its bucket costs; the decode figures are
per step of a `--decode_steps` call, sampled as the sweep does (T = 0.7, top-p 0.8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.common import best_time, define_model_flags, model_from_flags
from rosa2_jax.model.decode_rows import decode_chunk, empty_rows, prefill_row
from rosa2_jax.model.generation import SamplingConfig

FLAGS = flags.FLAGS
define_model_flags()
flags.DEFINE_integer("rows", 8, "decode batch")
flags.DEFINE_list("pieces", ["16", "32", "48", "64", "96", "128", "192"], "prefill piece lengths")
flags.DEFINE_list("capacities", ["512", "1024"], "cache slots per row for the decode step")
flags.DEFINE_integer("prefix", 200, "cached tokens before the piece (and in every row while decoding)")
flags.DEFINE_integer("decode_steps", 16, "decode steps per call")


def main(_):
    model = model_from_flags()
    cfg, params = model.cfg, model.params
    dtype = params["embed"].dtype
    key = jax.random.key(0)
    sampling = SamplingConfig(max_new_tokens=512, temperature=0.7, top_p=0.8)
    rows = empty_rows(cfg, FLAGS.rows, max(map(int, FLAGS.capacities)), sampling.max_new_tokens, dtype, pad_id=0)
    for n in map(int, FLAGS.pieces):
        tokens = jnp.asarray(np.arange(n) + 100, jnp.int32)

        def prefill():
            nonlocal rows
            rows = prefill_row(params, rows, jnp.int32(0), tokens, jnp.int32(n), jnp.int32(FLAGS.prefix), key, None,
                               None, jnp.int32(0), cfg=cfg, fresh=False)
            jax.block_until_ready(rows.length)

        prefill()
        print(f"prefill {n:5d} tokens  {1000 * best_time(prefill):8.1f} ms", flush=True)

    for capacity in map(int, FLAGS.capacities):
        rows = empty_rows(cfg, FLAGS.rows, capacity, sampling.max_new_tokens, dtype, pad_id=0)

        def decode():
            nonlocal rows
            rows = rows.replace(done=jnp.zeros(FLAGS.rows, bool), count=jnp.zeros(FLAGS.rows, jnp.int32),
                                length=jnp.full(FLAGS.rows, FLAGS.prefix, jnp.int32))
            rows, _, steps = decode_chunk(params, rows, None, None, jnp.zeros(FLAGS.rows, jnp.int32), cfg=cfg,
                                          sampling=sampling, stop_ids=(-1,), pad_id=0, steps=FLAGS.decode_steps)
            jax.block_until_ready(steps)

        decode()
        per_step = best_time(decode) / FLAGS.decode_steps
        print(f"decode {FLAGS.rows} rows x {capacity} slots  {1000 * per_step:8.1f} ms per step", flush=True)


if __name__ == "__main__":
    app.run(main)
