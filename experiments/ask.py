"""Answer prompts with a model, batched: the quickest way to see a checkpoint work.

    python -m experiments.ask --prompt="What is the capital of France?" --prompt="What is 2+2?"
"""

from __future__ import annotations

from absl import app, flags, logging

from experiments.common import define_model_flags, define_sampling_flags, model_from_flags, sampling_from_flags
from rosa2_jax.model.generation import generate
from rosa2_jax.model.tokenizer import render_chat, stop_token_ids

FLAGS = flags.FLAGS
define_model_flags()
define_sampling_flags(max_new_tokens=128, temperature=0.0, top_p=1.0)
flags.DEFINE_multi_string("prompt", ["What is the capital of France?"], "user message (repeat for a batch)")
flags.DEFINE_string("system", None, "optional system prompt")
flags.DEFINE_integer("seed", 0, "row i samples with seed + i")


def main(_):
    logging.set_verbosity(logging.WARNING)
    model = model_from_flags()
    tok = model.tokenizer
    system = [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []
    prompts = [render_chat(tok, system + [{"role": "user", "content": p}]) for p in FLAGS.prompt]
    gens = generate(model.params, model.cfg, prompts, sampling_from_flags(), stop_token_ids=stop_token_ids(tok),
                    pad_id=tok.pad_token_id, seeds=[FLAGS.seed + i for i in range(len(prompts))])
    for prompt, gen in zip(FLAGS.prompt, gens):
        print(f"> {prompt}\n{tok.decode(gen.tokens, skip_special_tokens=True).strip()}  [{gen.finish_reason}]\n")


if __name__ == "__main__":
    app.run(main)
