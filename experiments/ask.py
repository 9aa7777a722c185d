"""Answer prompts with a model, batched: the quickest way to see a checkpoint work.

    python -m experiments.ask --prompt="What is the capital of France?" --prompt="What is 2+2?"
"""

from __future__ import annotations

from absl import app, flags, logging

from experiments.common import define_model_flags, define_sampling_flags, model_from_flags, sampling_from_flags

FLAGS = flags.FLAGS
define_model_flags()
define_sampling_flags(max_new_tokens=128, temperature=0.0, top_p=1.0)
flags.DEFINE_multi_string("prompt", ["What is the capital of France?"], "user message (repeat for a batch)")
flags.DEFINE_string("system", None, "optional system prompt")
flags.DEFINE_integer("seed", 0, "row i samples with seed + i")


def main(_):
    logging.set_verbosity(logging.WARNING)
    sampler = model_from_flags().sampler
    system = [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []
    prompts = [sampler.render(system + [{"role": "user", "content": p}]) for p in FLAGS.prompt]
    gens = sampler.generate(prompts, sampling_from_flags(), seeds=[FLAGS.seed + i for i in range(len(prompts))])
    for prompt, gen in zip(FLAGS.prompt, gens):
        print(f"> {prompt}\n{sampler.decode(gen.tokens).strip()}  [{gen.finish_reason}]\n")


if __name__ == "__main__":
    app.run(main)
