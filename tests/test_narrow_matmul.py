"""narrow_matmul (bfloat16 weight, float32 activations) against float64 products of the bfloat16-rounded operands,
in its value, tangent, transpose and vmap; and the Weights step on a bfloat16 trunk against the float32 step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model
from test_rosa import CHUNK, make_batch

from rosa2_jax.adapt.rosa import RosaConfig, rosa_update
from rosa2_jax.checkpoint.hf_folder import load_hf_folder
from rosa2_jax.model.lora import LORA_TARGETS, LoraConfig, init_adapters
from rosa2_jax.model.narrow_matmul import narrow_matmul, weight_matmul


def _bf16(a) -> np.ndarray:
    """a rounded to bfloat16, as float64."""
    return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.fixture(scope="module")
def operands():
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (3, 5, 96))
    w = (0.1 * jax.random.normal(k[1], (96, 40))).astype(jnp.bfloat16)
    ct = jax.random.normal(k[2], (3, 5, 40))
    return x, w, ct


def test_value_is_the_rounded_operands_product_summed_in_float32(operands):
    x, w, _ = operands
    want = _bf16(x) @ _bf16(w)
    for fn in (narrow_matmul, jax.jit(narrow_matmul), weight_matmul):
        got = fn(x, w)
        assert got.dtype == jnp.float32 and got.shape == (3, 5, 40)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_tangent_and_transpose_round_their_input_to_the_weights_dtype(operands):
    """J v = bf16(v) W and Jᵀ u = bf16(u) Wᵀ, float32 sums: the transpose is the tangent's map on the cotangent,
    so both run as bfloat16 products (JAX's own transpose would take a float32 cotangent against the weight)."""
    x, w, ct = operands
    f = lambda x: jnp.sin(narrow_matmul(x, w))  # noqa: E731 (a nonlinearity after it, as in a layer)
    y, lin = jax.linearize(f, x)
    v = jax.random.normal(jax.random.key(7), x.shape)
    cos = np.cos(_bf16(x) @ _bf16(w))
    np.testing.assert_allclose(lin(v), cos * (_bf16(v) @ _bf16(w)), rtol=1e-4, atol=1e-5)
    (back,) = jax.linear_transpose(lin, x)(ct)
    np.testing.assert_allclose(back, _bf16(np.asarray(ct) * cos) @ _bf16(w).T, rtol=1e-3, atol=1e-4)
    dots = [e for e in jax.make_jaxpr(jax.linear_transpose(lin, x))(ct).jaxpr.eqns if "dot" in str(e.primitive)]
    assert not dots  # no mixed float32 x bfloat16 dot_general left for XLA to run at the float32 rate


@pytest.mark.parametrize("axis", [0, 1])
def test_vmap_over_a_batch_axis_of_x(operands, axis):
    x, w, _ = operands
    got = jax.vmap(narrow_matmul, (axis, None), axis)(x, w)
    np.testing.assert_allclose(got, _bf16(x) @ _bf16(w), rtol=1e-5, atol=1e-5)


def test_vmap_over_weights(operands):
    x, w, _ = operands
    ws = jnp.stack([w, (w.astype(jnp.float32) * 2).astype(jnp.bfloat16), -w])
    got = jax.vmap(narrow_matmul)(x, ws)
    np.testing.assert_allclose(got, np.einsum("bti,bio->bto", _bf16(x), _bf16(ws)), rtol=1e-5, atol=1e-5)


def test_the_weight_is_a_constant_of_the_derivative(operands):
    x, w, _ = operands
    with pytest.raises(NotImplementedError, match="constant"):
        jax.jvp(lambda w: narrow_matmul(x, w), (w,), (jnp.ones_like(w),))
    assert weight_matmul(x, w.astype(jnp.float32)).dtype == jnp.float32  # same widths: a plain matmul


def test_weights_step_on_a_bfloat16_trunk_agrees_with_the_float32_step(tmp_path):
    """The same step to bfloat16's precision: the direction (cosine of the two Δθ), the KL it reaches, and it
    still lowers KL(π*‖π) for every failing session."""
    make_hf_model("llama").save_pretrained(tmp_path)
    cfg, params = load_hf_folder(tmp_path)
    params = jax.tree.map(jnp.asarray, params)
    adapters = init_adapters(cfg, LoraConfig(rank=4, alpha=8.0, targets=LORA_TARGETS), 3, jax.random.key(1))
    batch = make_batch(cfg, 3, [-1.0, -1.0, -1.0], [True, True, True])
    steps = {dtype: rosa_update(params, adapters, batch, cfg=cfg,
                                rosa=RosaConfig(position_chunk=CHUNK, cg_iters=4, trunk_dtype=dtype))
             for dtype in (None, "bfloat16")}
    (f32, f32_stats), (bf16, bf16_stats) = steps[None], steps["bfloat16"]

    def step(new, s):
        return np.concatenate([np.ravel(new.factors[t][1][s] - adapters.factors[t][1][s]) for t in LORA_TARGETS])

    for s in range(3):
        d32, d16 = step(f32, s), step(bf16, s)
        assert d32 @ d16 / (np.linalg.norm(d32) * np.linalg.norm(d16)) > 0.99
        assert float(bf16_stats.kl_after[s]) < float(bf16_stats.kl_before[s])
        np.testing.assert_allclose(bf16_stats.kl_before[s], f32_stats.kl_before[s], rtol=0.02)
        np.testing.assert_allclose(bf16_stats.kl_after[s], f32_stats.kl_after[s], rtol=0.05)
