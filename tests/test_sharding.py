"""The logical-axes table: every parameter has axes of its rank, mapped to mesh axes by one rules table."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from rosa2_jax.config import ModelConfig
from rosa2_jax.model import forward, init_params, param_axes, param_shapes
from rosa2_jax.sharding import logical_to_spec, named_shardings

CFG = ModelConfig("qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64,
                  tie_word_embeddings=False)


def test_axes_cover_every_parameter_with_matching_rank():
    axes, shapes = param_axes(CFG), param_shapes(CFG)
    is_leaf = lambda x: isinstance(x, tuple)  # noqa: E731
    assert jax.tree.structure(axes, is_leaf=is_leaf) == jax.tree.structure(shapes, is_leaf=is_leaf)
    for a, s in zip(jax.tree.leaves(axes, is_leaf=is_leaf), jax.tree.leaves(shapes, is_leaf=is_leaf)):
        assert len(a) == len(s)


def test_rules_map_logical_axes_to_mesh_axes():
    assert logical_to_spec(("layers", "embed", "q_heads")) == PartitionSpec(None, None, "model")
    assert logical_to_spec(("batch", None, "vocab")) == PartitionSpec("data", None, "model")


def test_params_placed_with_named_shardings_compute_the_same():
    params = init_params(CFG, jax.random.key(0))
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    placed = jax.device_put(params, named_shardings(param_axes(CFG), mesh))
    tokens = jnp.arange(10, dtype=jnp.int32)[None] % CFG.vocab_size
    valid = jnp.ones_like(tokens, bool)
    np.testing.assert_array_equal(forward(placed, tokens, valid, cfg=CFG), forward(params, tokens, valid, cfg=CFG))
