"""Generation throughput: rosa2_jax against HF transformers (torch) `generate`, same weights and settings.

    python -m experiments.bench_generate --batch_sizes=1,8,32,64 --prompt_len=128 --new_tokens=64

Every row generates exactly --new_tokens tokens greedily (no early stop) from a --prompt_len prompt.
Reports tokens/s for both, the speed-up, and our achieved FLOP/s as a fraction of a measured matmul peak.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from experiments.common import best_time, matmul_peak_flops, param_count
from rosa2_jax.checkpoint import load_model, save_hf_folder
from rosa2_jax.model.generation import SamplingConfig, generate

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct", "built-in name, folder, GGUF file or hub id")
flags.DEFINE_list("batch_sizes", ["1", "8", "32", "64"], "batch sizes to measure")
flags.DEFINE_integer("prompt_len", 128, "prompt tokens per row")
flags.DEFINE_integer("new_tokens", 64, "generated tokens per row")
flags.DEFINE_bool("hf", True, "also measure HF transformers generate (needs torch)")
flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads (0 = torch default)")
flags.DEFINE_string("out", "runs/bench_generate.json", "where to write the measurements")


def generation_flops(cfg, n_params: int, batch: int, prompt: int, new: int) -> float:
    """Matmul FLOPs of prefill plus decode (weights and attention scores/values)."""
    # The embedding lookup is no matmul; the LM head is (and is the embedding itself when tied).
    matmul_params = n_params if cfg.tie_word_embeddings else n_params - cfg.vocab_size * cfg.hidden_size
    attn_per_token_per_ctx = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
    prefill = 2 * (matmul_params - cfg.vocab_size * cfg.hidden_size) * prompt + attn_per_token_per_ctx * prompt * prompt / 2
    prefill += 2 * cfg.vocab_size * cfg.hidden_size  # logits of the last prompt position only
    decode = sum(2 * matmul_params + attn_per_token_per_ctx * (prompt + i) for i in range(new))
    return batch * (prefill + decode)


def bench_ours(model, prompts, new_tokens):
    sampling = SamplingConfig(max_new_tokens=new_tokens)

    def run():
        out = generate(model.sampler.decode_params, model.cfg, prompts, sampling, stop_token_ids=[], pad_id=0)
        assert all(len(g.tokens) == new_tokens for g in out)
        return out

    gens = run()  # compiles; its tokens are compared with HF's
    return best_time(run, repeats=2), gens


def bench_hf(hf_model, prompts, new_tokens):
    import torch

    ids = torch.tensor(prompts)

    def run():
        with torch.no_grad():
            return hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

    with torch.no_grad():  # warm up torch's kernels on a short run
        hf_model.generate(ids[:, :8], attention_mask=torch.ones_like(ids[:, :8]), do_sample=False,
                          max_new_tokens=2, pad_token_id=0)
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def main(_):
    model = load_model(FLAGS.model)
    cfg = model.cfg
    rng = np.random.RandomState(0)
    peak = matmul_peak_flops()
    n_params = param_count(model.params)
    hf_model = None
    if FLAGS.hf:
        import torch
        from transformers import AutoModelForCausalLM

        if FLAGS.torch_threads:
            torch.set_num_threads(FLAGS.torch_threads)
        with tempfile.TemporaryDirectory() as tmp:
            save_hf_folder(tmp, cfg, jax.tree.map(np.asarray, model.params))
            hf_model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    rows = []
    print(f"model {FLAGS.model}: {n_params / 1e6:.1f}M params; prompt {FLAGS.prompt_len}, new {FLAGS.new_tokens}; "
          f"devices {jax.devices()}; matmul peak {peak / 1e9:.1f} GFLOP/s")
    print("| batch | rosa2_jax tok/s | HF tok/s | speed-up | achieved GFLOP/s | of peak | greedy tokens equal HF |")
    print("|---|---|---|---|---|---|---|")
    for b in map(int, FLAGS.batch_sizes):
        prompts = rng.randint(100, cfg.vocab_size, (b, FLAGS.prompt_len)).tolist()
        t_ours, gens = bench_ours(model, prompts, FLAGS.new_tokens)
        row = {"batch": b, "ours_s": t_ours, "ours_tok_s": b * FLAGS.new_tokens / t_ours}
        flops = generation_flops(cfg, n_params, b, FLAGS.prompt_len, FLAGS.new_tokens)
        row["achieved_flops"] = flops / t_ours
        row["fraction_of_peak"] = row["achieved_flops"] / peak
        if hf_model is not None:
            t_hf, hf_out = bench_hf(hf_model, prompts, FLAGS.new_tokens)
            row |= {"hf_s": t_hf, "hf_tok_s": b * FLAGS.new_tokens / t_hf}
            hf_new = hf_out[:, FLAGS.prompt_len:].tolist()
            row["rows_equal_hf"] = sum(g.tokens == h for g, h in zip(gens, hf_new))
        rows.append(row)
        hf_cells = (f"{row['hf_tok_s']:.1f} | {row['ours_tok_s'] / row['hf_tok_s']:.2f}x"
                    if "hf_tok_s" in row else "- | -")
        print(f"| {b} | {row['ours_tok_s']:.1f} | {hf_cells} | {row['achieved_flops'] / 1e9:.1f} | "
              f"{100 * row['fraction_of_peak']:.1f}% | {row.get('rows_equal_hf', '-')}/{b} |", flush=True)
    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": FLAGS.model, "prompt_len": FLAGS.prompt_len, "new_tokens": FLAGS.new_tokens,
                               "peak_flops": peak, "rows": rows}, indent=2))


if __name__ == "__main__":
    app.run(main)
