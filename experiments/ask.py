"""Answer prompts with a model, batched: the quickest way to see a checkpoint work.

    python -m experiments.ask --prompt="What is the capital of France?" --prompt="What is 2+2?"
"""

from __future__ import annotations

import jax.numpy as jnp
from absl import app, flags, logging

from rosa2_jax.checkpoint import load_model
from rosa2_jax.generation import SamplingConfig, generate
from rosa2_jax.tokenizer import render_chat, stop_token_ids

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct", "built-in name, converted/HF folder, GGUF file or hub id")
flags.DEFINE_multi_string("prompt", ["What is the capital of France?"], "user message (repeat for a batch)")
flags.DEFINE_string("system", None, "optional system prompt")
flags.DEFINE_integer("max_new_tokens", 128, "generation budget per answer")
flags.DEFINE_float("temperature", 0.0, "0 = greedy")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
flags.DEFINE_integer("top_k", 0, "top-k filter (0 = off)")
flags.DEFINE_integer("seed", 0, "row i samples with seed + i")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter dtype")
flags.DEFINE_string("cache_dir", None, "where built-in models are converted (default $ROSA2_CACHE or ~/.cache/rosa2_jax)")


def main(_):
    logging.set_verbosity(logging.WARNING)
    model = load_model(FLAGS.model, dtype=jnp.dtype(FLAGS.dtype), cache_dir=FLAGS.cache_dir)
    tok = model.tokenizer
    system = [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []
    prompts = [render_chat(tok, system + [{"role": "user", "content": p}]) for p in FLAGS.prompt]
    sampling = SamplingConfig(FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_p, FLAGS.top_k)
    gens = generate(model.params, model.cfg, prompts, sampling, stop_token_ids=stop_token_ids(tok),
                    pad_id=tok.pad_token_id, seeds=[FLAGS.seed + i for i in range(len(prompts))])
    for prompt, gen in zip(FLAGS.prompt, gens):
        print(f"> {prompt}\n{tok.decode(gen.tokens, skip_special_tokens=True).strip()}  [{gen.finish_reason}]\n")


if __name__ == "__main__":
    app.run(main)
