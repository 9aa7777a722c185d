"""A decode step's matmuls per call: the CPU matmul kernel this machine packs weights for (AMX tiles or FMA panels,
`decoder.matmul_packing`) against XLA's bfloat16 and float32 matmuls on the [out, in] weights, in one run.

    python -m experiments.bench_matmul --rows=1,16

The default shapes are the 0.5B built-in's (gate/up, down, q/o, the LM head). On a CPU where neither kernel runs,
only XLA's are timed; `ROSA2_JAX_FMA_MATMUL=off` / `ROSA2_JAX_AMX=off` show what XLA alone does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.common import best_time
from rosa2_jax.model.decoder import PACKINGS, matmul_packing

FLAGS = flags.FLAGS
flags.DEFINE_list("rows", ["1", "16"], "rows of x (a decode step's batch)")
flags.DEFINE_list("shapes", ["4864x896", "896x4864", "896x896", "151936x896"], "weights as OUTxIN")
flags.DEFINE_integer("repeats", 20, "timed calls per figure (the best counts)")


def main(_):
    packing = matmul_packing()
    print(f"kernel: {packing or 'none'} ({jax.devices()[0].device_kind})")
    print("| rows | weight | kernel ms | XLA bfloat16 ms | XLA float32 ms | kernel GFLOP/s |")
    print("|---|---|---|---|---|---|")
    xla = jax.jit(lambda x, w: jnp.einsum("mk,nk->mn", x.astype(w.dtype), w, preferred_element_type=jnp.float32))
    for rows in map(int, FLAGS.rows):
        for shape in FLAGS.shapes:
            n, k = map(int, shape.split("x"))
            x = jax.random.normal(jax.random.key(0), (rows, k), jnp.float32)
            w = jax.random.normal(jax.random.key(1), (n, k), jnp.bfloat16)
            calls = {"bfloat16": (xla, (x, w)), "float32": (xla, (x, w.astype(jnp.float32)))}
            if packing and PACKINGS[packing].packable(w):
                calls["kernel"] = (jax.jit(PACKINGS[packing].matmul), (x, PACKINGS[packing].pack(w)))
            ms = {}
            for name, (fn, args) in calls.items():
                jax.block_until_ready(fn(*args))
                ms[name] = 1000 * best_time(lambda: jax.block_until_ready(fn(*args)), repeats=FLAGS.repeats)
            kernel = f"{ms['kernel']:.3f}" if "kernel" in ms else "-"
            rate = f"{2 * rows * n * k / ms['kernel'] / 1e6:.0f}" if "kernel" in ms else "-"
            print(f"| {rows} | {n} x {k} | {kernel} | {ms['bfloat16']:.3f} | {ms['float32']:.3f} | {rate} |")


if __name__ == "__main__":
    app.run(main)
