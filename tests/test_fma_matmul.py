"""The FMA matmul (kernels/fma_matmul.py) against its sums written out in numpy, one float32 rounding per depth step,
bit for bit, and against XLA's bfloat16 matmul (decoding on it: tests/test_generate.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rosa2_jax.kernels.fma_matmul import (fma_matmul, fma_matmul_reference, fma_matmul_simd, pack_panels,
                                          unpack_panels)
from rosa2_jax.model.decoder import decode_layout, matmul_packing

needs_kernel = pytest.mark.skipif(fma_matmul_simd() is None, reason="this CPU has no AVX2 (or no C++ compiler)")


def depth_ordered_sums(x, w):
    """x rounded to bfloat16 times w [N, K]ᵀ, each output added up over depth in order in float32. A product of two
    bfloat16 numbers is exact in float32, so each step's float32 add rounds once, as an FMA does."""
    x = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))
    w = np.asarray(jnp.asarray(w).astype(jnp.float32))
    out = np.zeros((x.shape[0], w.shape[0]), np.float32)
    for k in range(x.shape[1]):
        out = out + np.outer(x[:, k], w[:, k])
    return out


def test_panels_hold_each_weight_where_the_kernel_reads_it():
    w = jnp.asarray(np.random.RandomState(0).randn(48, 40), jnp.bfloat16)
    panels = pack_panels(w)
    assert panels.shape == (3, 40, 16)
    # depth k of panel n holds columns 16n + (0, 8, 1, 9, ..., 7, 15): column c sits at 2c (c < 8) or 2(c - 8) + 1
    for n, k, c in [(0, 0, 0), (2, 39, 15), (1, 7, 8), (1, 3, 5)]:
        assert panels[n, k, 2 * c if c < 8 else 2 * (c - 8) + 1] == w[16 * n + c, k]
    assert jnp.array_equal(unpack_panels(panels), w)


@needs_kernel
@pytest.mark.parametrize("m", [1, 4, 7, 16, 37])
@pytest.mark.parametrize("n,k", [(32, 64), (128, 896), (4864, 896), (896, 4864), (400, 3)])
def test_kernel_gives_the_depth_ordered_sums_and_xlas_matmul_to_rounding(m, n, k):
    kx, kw = jax.random.split(jax.random.key(m * n + k))
    x = jax.random.normal(kx, (m, k), jnp.float32)
    w = jax.random.normal(kw, (n, k), jnp.bfloat16)
    y = np.asarray(jax.jit(fma_matmul)(x, pack_panels(w)))
    np.testing.assert_array_equal(y, depth_ordered_sums(x, w))
    xla = np.asarray(jax.jit(fma_matmul_reference)(x, pack_panels(w)))
    np.testing.assert_allclose(y, xla, rtol=0, atol=1e-5 * np.sqrt(k) * np.abs(xla).max())


@pytest.mark.skipif(fma_matmul_simd() != "avx512", reason="only a CPU with AVX-512 runs both lane codes")
def test_the_avx2_lane_code_gives_the_avx512_bits():
    x = jax.random.normal(jax.random.key(0), (13, 896), jnp.float32)
    panels = pack_panels(jax.random.normal(jax.random.key(1), (4864, 896), jnp.bfloat16))
    run = jax.jit(fma_matmul, static_argnames="simd")
    np.testing.assert_array_equal(np.asarray(run(x, panels, simd="avx2")).view(np.uint32),
                                  np.asarray(run(x, panels, simd="avx512")).view(np.uint32))


def test_the_default_packing_follows_the_cpu():
    params = {"embed": jnp.ones((16, 64), jnp.bfloat16), "layers": {"up": jnp.ones((2, 64, 32), jnp.bfloat16)}}
    decoded = decode_layout(params, jnp.bfloat16, out_in=True)
    packing = matmul_packing()
    assert set(decoded["layers"][0]) == {f"up_{packing}" if packing else "up_t"}
    with pytest.raises(ValueError, match="pack='bricks'"):
        decode_layout(params, jnp.bfloat16, out_in=True, pack="bricks")
