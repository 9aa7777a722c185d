"""What `--decode_dtype=bfloat16` changes against float32 decode weights on real prompts: greedy agreement and the
logits' error.

    python -m experiments.decode_dtype_agreement --model=qwen2.5-coder-0.5b-instruct --prompts=16 --new_tokens=256

Each GSM8K prompt (the sweep's chat template) is answered greedily with both decode layouts. Reported: the share of
answers that are token for token the same, the mean number of tokens before the first difference, and, teacher
forced on the float32 answers, the share of positions whose argmax agrees, the largest and mean absolute logit
difference, and the mean absolute difference of the log-probabilities of the float32 argmax tokens. Then the token
engine's rows (model/decode_rows.py), whose cache follows the decode weights' dtype: the bfloat16 weights' greedy
answers with a bfloat16 cache against the same weights with a float32 cache, counted the same way (a bfloat16
cache attended as the engine attends it: on the attention kernel where it runs, `ROSA2_JAX_ATTENTION=off` for XLA's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.common import define_model_flags, gsm8k_prompts, model_from_flags, prefilled_rows
from rosa2_jax.kernels.decode_attention import attention_kernel_supported
from rosa2_jax.model.decode_rows import decode_chunk
from rosa2_jax.model.decoder import decode_layout, forward
from rosa2_jax.model.generation import SamplingConfig, bucket_length, generate

FLAGS = flags.FLAGS
define_model_flags()
flags.DEFINE_integer("prompts", 16, "GSM8K prompts")
flags.DEFINE_integer("new_tokens", 256, "greedy tokens per answer")


def main(_):
    model = model_from_flags()
    cfg, sampler = model.cfg, model.sampler
    layouts = {"float32": decode_layout(model.params, jnp.float32), "bfloat16": decode_layout(model.params, jnp.bfloat16)}
    prompts = gsm8k_prompts(model, FLAGS.prompts, max_tokens=256)
    greedy = SamplingConfig(max_new_tokens=FLAGS.new_tokens)
    answers = {name: [g.tokens for g in generate(params, cfg, prompts, greedy, stop_token_ids=sampler.stop_ids,
                                                 pad_id=sampler.pad_id)]
               for name, params in layouts.items()}
    print("generate, bfloat16 against float32 weights: " + agreement(answers["float32"], answers["bfloat16"]))

    score = jax.jit(sequence_logits, static_argnames="cfg")
    agree, errors, logp_errors = [], [], []
    for prompt, answer in zip(prompts, answers["float32"]):  # one answer at a time: [answer, vocab] logits each
        tokens = np.zeros((1, bucket_length(len(prompt) + len(answer))), np.int32)  # right-padded: a few programs
        tokens[0, : len(prompt) + len(answer)] = prompt + answer
        at = slice(len(prompt) - 1, len(prompt) + len(answer) - 1)  # the positions predicting the answer
        f32, bf16 = (np.asarray(score(params, jnp.asarray(tokens), len(prompt) + len(answer), cfg=cfg))[at]
                     for params in layouts.values())
        top = f32.argmax(-1)
        agree.append(bf16.argmax(-1) == top)
        errors.append(np.abs(bf16 - f32))
        logp_errors.append(np.abs(log_prob(bf16, top) - log_prob(f32, top)))
    err = np.concatenate([e.ravel() for e in errors])
    print(f"teacher forced on the float32 answers ({sum(map(len, agree))} positions): argmax agrees at "
          f"{np.mean(np.concatenate(agree)):.2%}; |logit difference| max {err.max():.3f}, mean {err.mean():.4f}; "
          f"|log-prob difference| of the float32 argmax token: mean {np.mean(np.concatenate(logp_errors)):.4f}, "
          f"max {np.max(np.concatenate(logp_errors)):.3f}")

    caches = {dtype: rows_answers(layouts["bfloat16"], cfg, prompts, dtype, FLAGS.new_tokens, sampler)
              for dtype in (jnp.float32, jnp.bfloat16)}
    print("the token engine's rows, bfloat16 weights, bfloat16 against float32 cache: "
          + agreement(caches[jnp.float32], caches[jnp.bfloat16]))


def agreement(reference: list[list[int]], other: list[list[int]]) -> str:
    """How many answers are token for token the same, and where the others part."""
    first_difference = []
    for a, b in zip(reference, other):
        n = min(len(a), len(b))
        first_difference.append(next((i for i in range(n) if a[i] != b[i]), n))
    same = sum(a == b for a, b in zip(reference, other))
    return (f"greedy answers identical: {same}/{len(reference)}; tokens before the first difference: mean "
            f"{np.mean(first_difference):.0f}, min {min(first_difference)} (answers of {FLAGS.new_tokens} tokens at "
            "most)")


def rows_answers(params, cfg, prompts, dtype, new_tokens: int, sampler) -> list[list[int]]:
    """Greedy answers decoded as the token engine decodes: one prompt per row, a cache of `dtype`, 16-step calls."""
    capacity = bucket_length(max(map(len, prompts)) + new_tokens + 1)
    rows = prefilled_rows(params, cfg, prompts, capacity, new_tokens, dtype, sampler.pad_id)
    sessions, greedy = jnp.zeros(len(prompts), jnp.int32), SamplingConfig(max_new_tokens=new_tokens)
    while not bool(jnp.all(rows.done)):
        rows, *_ = decode_chunk(params, rows, None, None, sessions, cfg=cfg, sampling=greedy,
                                stop_ids=tuple(sampler.stop_ids), pad_id=sampler.pad_id, steps=16,
                                attention_kernel=attention_kernel_supported())
    out, count = jax.device_get((rows.out, rows.count))
    return [out[row, : count[row]].tolist() for row in range(len(prompts))]


def sequence_logits(params, tokens, length, *, cfg):
    """[slots, vocab] float32 logits of one right-padded sequence of `length` tokens."""
    valid = jnp.arange(tokens.shape[1])[None] < length
    return forward(params, tokens, valid, cfg=cfg)[0].astype(jnp.float32)


def log_prob(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    m = logits.max(-1, keepdims=True)
    return logits[np.arange(len(tokens)), tokens] - (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))


if __name__ == "__main__":
    app.run(main)
