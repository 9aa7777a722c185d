"""Helpers shared by the commands: model, decoding, engine and Words flags and the one path from them to an
EngineConfig, wall-clock timing, the machine's measured matmul peak and read bandwidth, and the roofline of a decode
step."""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.sharding import Mesh

from rosa2_jax.adapt.rosa import RESIDUALS, TILTS, TRUNK_DTYPES
from rosa2_jax.adapt.text_models import TextModel, make_text_model
from rosa2_jax.adapt.words import REFERENCES, RETRIES
from rosa2_jax.checkpoint import LoadedModel, load_model
from rosa2_jax.engine import ADAPTERS, MATH_SYSTEM_PROMPT, PRESETS, REWARDS, EngineConfig, WeightsPreset
from rosa2_jax.fetch import cache_root
from rosa2_jax.model.config import ModelConfig
from rosa2_jax.model.decode_rows import DecodeRows, empty_rows, prefill_row
from rosa2_jax.model.decoder import PACKINGS, decode_layout
from rosa2_jax.model.generation import SamplingConfig
from rosa2_jax.study.runs import NotARunError, read_run
from rosa2_jax.tasks.data import load_problems
from rosa2_jax.tasks.rewards import EQUIVALENCES

FLAGS = flags.FLAGS
# --remat=auto stores a Weights pass's activations up to this many tokens: ~2.2 MB a token on the 0.5B with the
# fast preset, so ~4.5 GB (BUILD_NOTES.md, "The Weights step").
AUTO_STORED_TOKENS = 2048


def define_model_flags(default: str = "smollm2-135m-instruct") -> None:
    flags.DEFINE_string("model", default, "built-in name, converted/HF folder, GGUF file or hub id")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter dtype")
    flags.DEFINE_enum("decode_dtype", "bfloat16", ["float32", "bfloat16"], "generation's matmul weights: "
                      "bfloat16 beside float32 params multiplies in bfloat16 with float32 accumulation and a float32 "
                      "residual stream, ~2.4x faster decode steps on a CPU, argmax agreeing with float32 at 99.85% "
                      "of the built-in's positions (BUILD_NOTES.md, \"The decode step against its roofline\")")
    flags.DEFINE_string("cache_dir", None, "model/data cache (default $ROSA2_CACHE or ~/.cache/rosa2_jax)")


def model_from_flags(mesh: Mesh | None = None, spec: str | None = None) -> LoadedModel:
    """`--model` (or `spec`, e.g. a critic's), loaded with the run's dtype and cache."""
    return load_model(spec or FLAGS.model, dtype=jnp.dtype(FLAGS.dtype), cache_dir=FLAGS.cache_dir, mesh=mesh,
                      decode_dtype=jnp.dtype(FLAGS.decode_dtype))


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


def define_engine_flags(*, max_turns: int, slots: int, max_context: int) -> None:
    """Every EngineConfig field's flag (with the Words flags), for the sweep and the benchmarks alike."""
    flags.DEFINE_integer("max_turns", max_turns, "K: turns per problem")
    flags.DEFINE_integer("slots", slots, "decode batch: rows generating at once (with --scheduler=turn, the sessions)")
    flags.DEFINE_integer("sessions", 0, "--scheduler=token: sessions in the pool (0 = twice --slots)")
    flags.DEFINE_integer("decode_steps", 16,
                         "--scheduler=token: tokens decoded per device call (over a float32 cache it also ends "
                         "when an answer stops)")
    flags.DEFINE_integer("prefill_chunk", 512, "--scheduler=token: longest prompt piece prefilled in one call")
    flags.DEFINE_integer("max_programs", 64, "compiled programs (one per shape) held before all are released, "
                         "bounding host memory over a long run; 0 = never (rosa2_jax/engine/host_memory.py)")
    flags.DEFINE_integer("seed", 0, "problem subsample, adapter init and sampling seed")
    flags.DEFINE_integer("max_context", max_context, "token budget per prompt + response; over it the oldest "
                         "answers are trimmed first, never the first user message or the message a turn answers")
    flags.DEFINE_enum("equivalence", "math-verify", list(EQUIVALENCES), "math answer equivalence")
    flags.DEFINE_bool("boxed_only", True, "count only an answer in \\boxed{} (the paper's rule-based reward); "
                      "--noboxed_only also reads GSM8K's last number and a choice letter outside a box")
    # the Weights stream
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
    flags.DEFINE_integer("backtrack", None, "halve a step that raises KL(pi*||pi) up to this many times, else keep "
                         "the adapter; 0 = the plain step (default: the preset's)")
    flags.DEFINE_enum("trunk_dtype", None, list(TRUNK_DTYPES), "the Weights step's layer matmuls: bfloat16 operands "
                      "with float32 sums (value, JVP and VJP), as a TPU multiplies float32 by default; a step 1.3-1.5x "
                      "faster on a CPU with AMX, measure first on one without (default: the preset's, float32)")
    flags.DEFINE_float("damping", 1e-4, "λ relative to mean diag(JᵀJ)")
    flags.DEFINE_float("max_step_norm", None, "trust region on ||Δθ|| (default: the preset's)")
    flags.DEFINE_integer("lora_rank", 8, "LoRA rank")
    flags.DEFINE_float("lora_alpha", 16.0, "LoRA alpha")
    flags.DEFINE_list("lora_targets", None, "LoRA targets from q,k,v,o,gate,up,down (default: the preset's)")
    flags.DEFINE_enum("remat", "auto", ["auto", "on", "off"], "recompute activations in the ROSA update (less memory, "
                      f"~20% slower); auto = on for a pass of more than {AUTO_STORED_TOKENS} tokens (sessions x row)")
    flags.DEFINE_integer("update_batch", 1, "sessions per vmapped pass of a Weights step, passes one after another "
                         "(0 = the whole bucket at once: faster on an accelerator with memory to spare; on a CPU the "
                         "same speed)")
    # the Words stream
    define_words_flags()
    flags.DEFINE_integer("switch_turn", 5, "`switch`: turn from which the second axis is used")
    flags.DEFINE_enum("switch_first", "words", ["words", "weights"], "`switch`: the axis used first")


def run_from_flags() -> tuple[Path, dict, list[dict]]:
    """--run_dir, its config and its records; a folder that is not a sweep's is a usage error."""
    run_dir = Path(FLAGS.run_dir)
    try:
        return run_dir, *read_run(run_dir)
    except NotARunError as e:
        raise app.UsageError(str(e)) from None


def weights_preset() -> WeightsPreset:
    """--preset, with each of its fields that has its own flag given on the command line overriding it."""
    fields = (f.name for f in dataclasses.fields(WeightsPreset))
    given = {name: getattr(FLAGS, name) for name in fields if getattr(FLAGS, name) is not None}
    return dataclasses.replace(PRESETS[FLAGS.preset], **given)


def engine_config_from_flags(method: str, num_layers: int) -> EngineConfig:
    """The run's EngineConfig (`method` runs the problems given without one) for a `num_layers`-layer policy."""
    preset = weights_preset()
    try:
        lora = preset.lora(num_layers, rank=FLAGS.lora_rank, alpha=FLAGS.lora_alpha)
    except ValueError as e:
        raise app.UsageError(f"--lora_layers / --lora_targets: {e}") from None
    return EngineConfig(
        method=method, max_turns=FLAGS.max_turns, rows=FLAGS.slots, sampling=sampling_from_flags(),
        rosa=preset.rosa(beta=FLAGS.beta, tilt=FLAGS.tilt, residual=FLAGS.residual, damping=FLAGS.damping,
                         remat=FLAGS.remat != "off", session_batch=FLAGS.update_batch,
                         store_up_to=AUTO_STORED_TOKENS if FLAGS.remat == "auto" else 0),
        lora=lora, adapter=preset.adapter, switch_turn=FLAGS.switch_turn, switch_first=FLAGS.switch_first,
        seed=FLAGS.seed, equivalence=FLAGS.equivalence, boxed_only=FLAGS.boxed_only, reward=FLAGS.reward,
        critic_tokens=FLAGS.critic_tokens, rewrite_tokens=FLAGS.rewrite_tokens, words_retries=FLAGS.words_retries,
        critic_reference=FLAGS.critic_reference, max_context=FLAGS.max_context, sessions=FLAGS.sessions,
        decode_steps=FLAGS.decode_steps, prefill_chunk=FLAGS.prefill_chunk, max_programs=FLAGS.max_programs)


def text_model_from_flags(policy: LoadedModel, mesh: Mesh | None = None) -> TextModel:
    kind, _, spec = FLAGS.text_model.partition(":")
    if kind not in ("local", "openai", "rule") or (spec and kind != "local"):
        raise app.UsageError(f"--text_model={FLAGS.text_model!r}: use local, local:<model spec>, openai or rule")
    return make_text_model(kind, model=local_critic(spec, policy, mesh), url=FLAGS.text_model_url,
                           name=FLAGS.text_model_name)


def sampling_from_flags() -> SamplingConfig:
    return SamplingConfig(FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_p, FLAGS.top_k)


def gsm8k_prompts(model: LoadedModel, count: int, max_tokens: int) -> list[list[int]]:
    """Chat-template prompts (the sweep's system prompt and a GSM8K question) of at most `max_tokens` tokens."""
    problems, _ = load_problems("gsm8k", seed=0, cache_dir=FLAGS.cache_dir)
    prompts = []
    for p in problems:
        ids = model.sampler.render([{"role": "system", "content": MATH_SYSTEM_PROMPT},
                                    {"role": "user", "content": p.question}])
        if len(ids) <= max_tokens:
            prompts.append(ids)
        if len(prompts) == count:
            return prompts
    raise app.UsageError(f"fewer than {count} GSM8K prompts have at most {max_tokens} tokens")


def prefilled_rows(params, cfg: ModelConfig, prompts: list[list[int]], capacity: int, max_new_tokens: int, dtype,
                   pad_id: int) -> DecodeRows:
    """Token-engine rows of a `capacity`-slot cache of `dtype`, one prompt prefilled into each (row r keyed r)."""
    rows = empty_rows(cfg, len(prompts), capacity, max_new_tokens, dtype, pad_id)
    for row, prompt in enumerate(prompts):
        rows = prefill_row(params, rows, row, prompt, jax.random.key(row), cfg=cfg, pad_id=pad_id)
    return rows


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Fastest of `repeats` runs (seconds); `fn` must block until its result is ready."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def traced_op_seconds(run: Callable[[], object], hlo: str, part: Callable[[str], str],
                      calls: int = 1) -> tuple[list[tuple[str, float]], float]:
    """([(part, seconds)] most first, wall seconds) of `calls` traced runs of `run`, a compiled program whose HLO
    text is `hlo`: XLA's per-op events (jax.profiler), each op put in `part(op_name)` by the op_name of its HLO
    metadata (the named scopes and transforms, e.g. ".../transpose(jvp())/.../attention/..."). XLA runs
    independent ops on both cores at once, so the parts can add up to more than the wall time: read them as
    shares."""
    op_names, containers = {}, set()
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.-]+) = .*?\b([a-z][\w-]*)\(", line)
        if not m:
            continue
        name, opcode = m.groups()
        op_name = re.search(r'op_name="([^"]*)"', line)
        op_names[name] = op_name.group(1) if op_name else ""
        if opcode in ("while", "conditional", "call"):  # their bodies' ops have their own events
            containers.add(name)
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(calls):
                run()
            wall = time.perf_counter() - start
        trace = json.load(gzip.open(next(Path(folder).rglob("perfetto_trace.json.gz"))))
    spent = collections.Counter()
    for e in trace["traceEvents"] if isinstance(trace, dict) else trace:
        name = e.get("name")
        if e.get("ph") == "X" and name in op_names and name not in containers:
            spent[part(op_names[name])] += e["dur"] / 1e6
    return spent.most_common(), wall


def matmul_peak_flops(n: int = 2048, dtype=jnp.float32, *, packing: str | None = None) -> float:
    """Measured FLOP/s of one large square matmul on the default device: XLA's, or with `packing` ("tiles",
    "panels") a CPU matmul kernel's on bfloat16 weights packed as decoding packs them (decoder.PACKINGS)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16 if packing else dtype)
    if packing:
        kernel = PACKINGS[packing]
        f, args = jax.jit(kernel.matmul), (a, kernel.pack(a))
    else:
        f, args = jax.jit(lambda x: x @ x), (a,)
    f(*args).block_until_ready()
    return 2 * n**3 / best_time(lambda: f(*args).block_until_ready(), repeats=5)


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
    matrices = [w for w in jax.tree.leaves(decoded["layers"]) if w.ndim >= 2]  # [out, in] or packed
    head = next(decoded[k] for k in (*(f"head_{p}" for p in PACKINGS), "head_t", "lm_head", "embed") if k in decoded)
    weights = sum(w.size for w in matrices) + head.size
    attention_flops = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context
    kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context * kv_itemsize
    return Roofline(flops=rows * (2 * weights + attention_flops),
                    bytes=sum(w.nbytes for w in matrices) + head.nbytes + rows * kv_bytes, peak_flops=peak_flops,
                    bandwidth=bandwidth)
