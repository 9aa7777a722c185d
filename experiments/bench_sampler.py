"""Top-p sampling cost per decode step: the nucleus found among the top-k candidates against the sort of
the whole vocabulary it falls back to, in one run.

    python -m experiments.bench_sampler --rows=8 --vocab=151936

Peaked logits (a nucleus of a few tokens, what a model mostly emits) take the candidate path; flat logits
(a nucleus longer than the candidates) take the full sort, which every step paid before.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.common import best_time
from rosa2_jax.model.generation import SamplingConfig, sample_logits

FLAGS = flags.FLAGS
flags.DEFINE_integer("rows", 8, "decode batch")
flags.DEFINE_integer("vocab", 151936, "vocabulary size (Qwen2.5's by default)")
flags.DEFINE_float("top_p", 0.8, "nucleus mass")
flags.DEFINE_float("temperature", 0.7, "sampling temperature")


def main(_):
    sampling = SamplingConfig(max_new_tokens=1, temperature=FLAGS.temperature, top_p=FLAGS.top_p)
    sample = jax.jit(lambda logits, keys: sample_logits(logits, keys, sampling))
    keys = jax.random.split(jax.random.key(0), FLAGS.rows)
    normal = np.random.default_rng(0).normal(size=(FLAGS.rows, FLAGS.vocab)).astype(np.float32)
    for name, scale in (("peaked (candidates)", 8.0), ("flat (full sort)", 0.05)):
        logits = jnp.asarray(normal * scale)
        jax.block_until_ready(sample(logits, keys))
        seconds = best_time(lambda: jax.block_until_ready(sample(logits, keys)), repeats=10)
        print(f"{name:20s} {1000 * seconds:8.1f} ms per step of {FLAGS.rows} rows")


if __name__ == "__main__":
    app.run(main)
