"""Sharding: the logical-axes table, placement on (data, model) meshes of 8 virtual CPU devices, and
generation, the ROSA update and checkpoint restore giving the single-device results there."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from rosa2_jax.adapt.rosa import RosaConfig, UpdateBatch, rosa_update
from rosa2_jax.checkpoint.store import load_converted, save_converted
from rosa2_jax.model.config import ModelConfig
from rosa2_jax.model.decoder import forward
from rosa2_jax.kernels.decode_attention import attention_kernel_supported
from rosa2_jax.kernels.lora_matmul import kernel_supported
from rosa2_jax.kernels.top_k import top_k_kernel_supported
from rosa2_jax.model.generation import SamplingConfig, decode_path, generate, left_pad
from rosa2_jax.model.lora import LoraAdapters, LoraConfig, init_adapters
from rosa2_jax.model.params import ParamInfo, init_params, param_shardings
from rosa2_jax.model.sharding import logical_to_spec, make_mesh, shard_batch

CFG = ModelConfig("qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64,
                  tie_word_embeddings=False)


def test_a_parameter_record_with_axes_of_another_rank_is_refused():
    with pytest.raises(ValueError, match="differ in rank"):
        ParamInfo((4, 8), ("embed",), "w")


def test_rules_map_logical_axes_to_mesh_axes():
    assert logical_to_spec(("layers", "embed", "q_heads")) == PartitionSpec(None, None, "model")
    assert logical_to_spec(("batch", None, "vocab")) == PartitionSpec("data", None, "model")


def test_an_axis_the_mesh_does_not_divide_is_replicated():
    mesh = make_mesh(2, 4)
    odd = CFG.__class__(**{**CFG.__dict__, "vocab_size": 101, "num_kv_heads": 2})
    shardings = param_shardings(odd, mesh)
    assert shardings["embed"].spec == PartitionSpec(None, None)  # 101 tokens over 4: replicated
    assert shardings["layers"]["q"].spec == PartitionSpec(None, None, "model")  # 4 heads over 4
    assert shardings["layers"]["k"].spec == PartitionSpec(None, None, None)  # 2 kv heads over 4: whole heads only
    assert shardings["layers"]["down"].spec == PartitionSpec(None, "model", None)


def test_mesh_larger_than_the_devices_is_a_clear_error():
    with pytest.raises(ValueError, match="mesh 4x4 needs 16 devices, this process has 8"):
        make_mesh(4, 4)


def test_kernels_run_only_where_the_rows_are_on_one_device():
    """A custom call is not split by the partitioner: on a mesh of several devices every kernel is off and the
    recorded decode path says so; a one-device mesh computes (and records) as no mesh does."""
    sharded = make_mesh(4, 2)
    assert not (attention_kernel_supported(sharded) or top_k_kernel_supported(sharded) or kernel_supported(sharded))
    assert decode_path("bfloat16", sharded) == ("bfloat16-cache-full-calls-grouped-prompt-sized-prefill-kept-layers"
                                                "-query-blocks")
    assert decode_path("bfloat16", make_mesh(1, 1)) == decode_path("bfloat16", None)
    assert attention_kernel_supported(make_mesh(1, 1)) == attention_kernel_supported(None)


def test_params_restored_into_a_4x2_sharding_equal_the_saved_ones(tmp_path):
    params = init_params(CFG, jax.random.key(0))
    (tmp_path / "tok").mkdir()
    folder = save_converted(tmp_path / "ckpt", CFG.to_hf(), params, tmp_path / "tok")
    mesh = make_mesh(4, 2)
    cfg, restored = load_converted(folder, mesh=mesh)
    assert cfg == CFG
    expected = param_shardings(CFG, mesh)
    for got, want, ref in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), jax.tree.leaves(params)):
        assert got.sharding == want
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    q = restored["layers"]["q"]  # really split: each device holds half the heads
    assert q.addressable_shards[0].data.shape == (2, 32, 16) and len(q.sharding.device_set) == 8


@pytest.mark.parametrize("shape,trunk_dtype", [((8, 1), None), ((4, 2), None), ((1, 1), None),
                                               pytest.param((4, 2), "bfloat16", marks=pytest.mark.slow)])
def test_generation_and_update_on_a_mesh_equal_the_single_device_run(shape, trunk_dtype):
    params = init_params(CFG, jax.random.key(1))
    params = jax.tree.map(lambda x: x * 10 if x.ndim == 3 else x, params)  # sharper logits: greedy has no near-ties
    lora = LoraConfig(rank=2, targets=("q", "v", "down"))
    ad = init_adapters(CFG, lora, 8, jax.random.key(2))
    ad = LoraAdapters({t: (a, 0.05 * jax.random.normal(jax.random.key(3), b.shape)) for t, (a, b) in ad.factors.items()},
                      ad.scale)
    r = np.random.RandomState(0)
    prompts = [r.randint(1, CFG.vocab_size, 3 + 2 * i).tolist() for i in range(8)]
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.0)
    mesh = make_mesh(*shape)
    placed = jax.device_put(params, param_shardings(CFG, mesh))
    placed_ad = shard_batch(ad, mesh)

    ref = generate(params, CFG, prompts, sampling, stop_token_ids=[0], pad_id=0, adapters=ad)
    got = generate(placed, CFG, prompts, sampling, stop_token_ids=[0], pad_id=0, adapters=placed_ad, mesh=mesh)
    assert [g.tokens for g in got] == [g.tokens for g in ref]

    rows = [p + g.tokens for p, g in zip(prompts, ref)]
    tokens, valid = left_pad(rows, 32, 0)
    batch = UpdateBatch(jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray([len(g.tokens) for g in ref]),
                        -jnp.ones(8), jnp.arange(8) % 3 != 0, window=8)
    rosa = RosaConfig(cg_iters=4, position_chunk=4, trunk_dtype=trunk_dtype)
    new_ref, stats_ref = rosa_update(params, ad, batch, cfg=CFG, rosa=rosa)
    new, stats = rosa_update(placed, placed_ad, shard_batch(batch, mesh), cfg=CFG, rosa=rosa)
    if shape[0] > 1:  # the updated adapters stay split over the session slots
        assert new.factors["q"][0].sharding.spec[0] == "data"
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(new_ref)):
        if trunk_dtype is None:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
        else:  # bfloat16 rounds the model axis's partial sums at other points: the same step to its precision
            assert np.linalg.norm(np.asarray(a) - np.asarray(b)) < 1e-2 * np.linalg.norm(np.asarray(b))
    np.testing.assert_allclose(stats.kl_after, stats_ref.kl_after, rtol=1e-4 if trunk_dtype is None else 1e-2,
                               atol=1e-7)
    assert np.all(np.asarray(stats.step_norm_sq)[np.arange(8) % 3 == 0] == 0)


def test_forward_with_placed_params_computes_the_same():
    params = init_params(CFG, jax.random.key(0))
    placed = jax.device_put(params, param_shardings(CFG, make_mesh(4, 2)))
    tokens = jnp.arange(10, dtype=jnp.int32)[None] % CFG.vocab_size
    valid = jnp.ones_like(tokens, bool)
    np.testing.assert_allclose(forward(placed, tokens, valid, cfg=CFG), forward(params, tokens, valid, cfg=CFG),
                               rtol=1e-5, atol=1e-6)
