"""Helpers shared by the commands: model and decoding flags, wall-clock timing, the measured matmul peak."""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
from absl import flags
from jax.sharding import Mesh

from rosa2_jax.checkpoint import LoadedModel, load_model
from rosa2_jax.fetch import cache_root
from rosa2_jax.model.generation import SamplingConfig

FLAGS = flags.FLAGS


def define_model_flags(default: str = "smollm2-135m-instruct") -> None:
    flags.DEFINE_string("model", default, "built-in name, converted/HF folder, GGUF file or hub id")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter dtype")
    flags.DEFINE_string("cache_dir", None, "model/data cache (default $ROSA2_CACHE or ~/.cache/rosa2_jax)")


def model_from_flags(mesh: Mesh | None = None, spec: str | None = None) -> LoadedModel:
    """`--model` (or `spec`, e.g. a critic's), loaded with the run's dtype and cache."""
    return load_model(spec or FLAGS.model, dtype=jnp.dtype(FLAGS.dtype), cache_dir=FLAGS.cache_dir, mesh=mesh)


def keep_compiled_programs() -> None:
    """Keep XLA's compiled programs in <cache>/xla, so that a resumed sweep loads its decode and update programs
    instead of compiling them again (the 0.5B's Weights step can take minutes to compile here)."""
    jax.config.update("jax_compilation_cache_dir", str(cache_root(FLAGS.cache_dir) / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def local_critic(spec: str, policy: LoadedModel, mesh: Mesh | None = None) -> LoadedModel:
    """The model behind `--text_model=local[:<model spec>]`: the policy itself, or another model loaded beside it."""
    return model_from_flags(mesh, spec) if spec else policy


def define_sampling_flags(*, max_new_tokens: int, temperature: float, top_p: float) -> None:
    flags.DEFINE_integer("max_new_tokens", max_new_tokens, "response budget per answer")
    flags.DEFINE_float("temperature", temperature, "sampling temperature (0 = greedy)")
    flags.DEFINE_float("top_p", top_p, "nucleus mass (1 = off)")
    flags.DEFINE_integer("top_k", 0, "top-k filter (0 = off)")


def sampling_from_flags() -> SamplingConfig:
    return SamplingConfig(FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_p, FLAGS.top_k)


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Fastest of `repeats` runs (seconds); `fn` must block until its result is ready."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak_flops(n: int = 2048, dtype=jnp.float32) -> float:
    """Measured FLOP/s of one large square matmul on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    return 2 * n**3 / best_time(lambda: f(a).block_until_ready(), repeats=5)


def param_count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))
