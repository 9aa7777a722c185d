"""Helpers shared by the commands: model, decoding and Words flags, wall-clock timing, the machine's measured matmul peak
and read bandwidth, and the roofline of a decode step."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.sharding import Mesh

from rosa2_jax.adapt.text_models import TextModel, make_text_model
from rosa2_jax.adapt.words import REFERENCES, RETRIES
from rosa2_jax.checkpoint import LoadedModel, load_model
from rosa2_jax.fetch import cache_root
from rosa2_jax.model.config import ModelConfig
from rosa2_jax.model.decoder import decode_layout
from rosa2_jax.model.generation import SamplingConfig

FLAGS = flags.FLAGS


def define_model_flags(default: str = "smollm2-135m-instruct") -> None:
    flags.DEFINE_string("model", default, "built-in name, converted/HF folder, GGUF file or hub id")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter dtype")
    flags.DEFINE_enum("decode_dtype", None, ["float32", "bfloat16"], "generation's matmul weights (default: "
                      "--dtype); bfloat16 beside float32 params multiplies in bfloat16 with float32 accumulation "
                      "and a float32 residual stream (BUILD_NOTES.md, \"Decode speed\")")
    flags.DEFINE_string("cache_dir", None, "model/data cache (default $ROSA2_CACHE or ~/.cache/rosa2_jax)")


def model_from_flags(mesh: Mesh | None = None, spec: str | None = None) -> LoadedModel:
    """`--model` (or `spec`, e.g. a critic's), loaded with the run's dtype and cache."""
    return load_model(spec or FLAGS.model, dtype=jnp.dtype(FLAGS.dtype), cache_dir=FLAGS.cache_dir, mesh=mesh,
                      decode_dtype=FLAGS.decode_dtype and jnp.dtype(FLAGS.decode_dtype))


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


def define_words_flags() -> None:
    """The Words stream's text model and budgets (math_sweep, refine)."""
    flags.DEFINE_string("text_model", "local", "critic and instruction writer: local (the policy's own base weights), "
                        "local:<model spec> (another local model, e.g. local:qwen2.5-coder-0.5b-instruct), openai, "
                        "rule")
    flags.DEFINE_string("text_model_url", None, "OpenAI-compatible base URL (--text_model=openai)")
    flags.DEFINE_string("text_model_name", None, "model name on that server")
    flags.DEFINE_integer("critic_tokens", 64, "critique budget (the first wrong step and its category)")
    flags.DEFINE_integer("rewrite_tokens", 64, "budget of each instruction candidate")
    flags.DEFINE_integer("words_retries", RETRIES, "sampled candidates after a refused instruction, before the "
                         "fallbacks")
    flags.DEFINE_enum("critic_reference", "none", list(REFERENCES), "what the Words critic sees of the reference: "
                      "none (the paper's self-critic), the answer, or the worked solution (GSM8K, MATH; else the "
                      "answer)")


def text_model_from_flags(policy: LoadedModel, mesh: Mesh | None = None) -> TextModel:
    kind, _, spec = FLAGS.text_model.partition(":")
    if kind not in ("local", "openai", "rule") or (spec and kind != "local"):
        raise app.UsageError(f"--text_model={FLAGS.text_model!r}: use local, local:<model spec>, openai or rule")
    return make_text_model(kind, model=local_critic(spec, policy, mesh), url=FLAGS.text_model_url,
                           name=FLAGS.text_model_name)


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


def read_bandwidth(gib: float = 1.0) -> float:
    """Measured bytes/s of a jitted sum over a `gib`-GiB float32 array (read once, nothing written)."""
    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    return x.nbytes / best_time(lambda: f(x).block_until_ready(), repeats=5)


@dataclasses.dataclass(frozen=True)
class Roofline:
    """The least time a decode step of `rows` rows over `context` cached tokens can take on this machine: every
    weight matrix read once, every row's keys/values read once, every multiply-add done once."""

    flops: float
    bytes: float
    peak_flops: float
    bandwidth: float

    @property
    def seconds(self) -> float:
        return max(self.flops / self.peak_flops, self.bytes / self.bandwidth)

    @property
    def bound(self) -> str:
        return "compute" if self.flops / self.peak_flops >= self.bytes / self.bandwidth else "bandwidth"


def decode_roofline(cfg: ModelConfig, params, rows: int, context: int, peak_flops: float,
                    bandwidth: float, kv_itemsize: int = 4) -> Roofline:
    """The matmuls of every layer and the LM head for each row, plus attention over `context` slots, with the
    weights as generation holds them (decoder.decode_layout: their dtype sets the bytes read)."""
    decoded = decode_layout(params)
    matrices = [w for w in jax.tree.leaves(decoded["layers"]) if w.ndim == 2]
    head = decoded.get("head_t", decoded.get("lm_head", decoded["embed"]))
    weights = sum(w.size for w in matrices) + head.size
    attention_flops = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context
    kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context * kv_itemsize
    return Roofline(flops=rows * (2 * weights + attention_flops),
                    bytes=sum(w.nbytes for w in matrices) + head.nbytes + rows * kv_bytes, peak_flops=peak_flops,
                    bandwidth=bandwidth)
