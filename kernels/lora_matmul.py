"""Per-row LoRA matmul, y_b = x_b W + scale * (x_b A_b) B_b, as a Pallas kernel.

Each program computes one (row, token block, output block) tile: the base matmul and the rank-r
correction share the x tile, so the adapter adds one small extra matmul per tile and W is read once per
tile, never copied per row. Forward only (generation); the ROSA update differentiates the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from rosa2_jax.kernels import on_one_device
from rosa2_jax.model.narrow_matmul import weight_matmul


def lora_matmul_reference(
    x: Float[Array, "B T I"], w: Float[Array, "I O"], a: Float[Array, "B I R"], b: Float[Array, "B R O"], scale: float
) -> Float[Array, "B T O"]:
    return weight_matmul(x, w) + lora_delta(x, a, b, scale)


def lora_delta(x: Float[Array, "B T I"], a: Float[Array, "B I R"], b: Float[Array, "B R O"],
               scale: float) -> Float[Array, "B T O"]:
    """The adapters' term alone: scale * (x A) B, per row."""
    xa = jnp.einsum("bti,bir->btr", x, a.astype(x.dtype))
    return scale * jnp.einsum("btr,bro->bto", xa, b.astype(x.dtype))


def _kernel(x_ref, w_ref, a_ref, b_ref, o_ref, *, scale: float):
    x = x_ref[...]
    acc = jnp.dot(x, w_ref[...], preferred_element_type=jnp.float32)
    xa = jnp.dot(x, a_ref[...].astype(x.dtype), preferred_element_type=jnp.float32)
    acc = acc + scale * jnp.dot(xa.astype(x.dtype), b_ref[...].astype(x.dtype), preferred_element_type=jnp.float32)
    o_ref[...] = acc.astype(o_ref.dtype)


def _pad_to(x: Array, axis: int, multiple: int) -> Array:
    pad = -x.shape[axis] % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


@functools.partial(jax.jit, static_argnames=("scale", "block_t", "block_o", "interpret"))
def lora_matmul(
    x: Float[Array, "B T I"], w: Float[Array, "I O"], a: Float[Array, "B I R"], b: Float[Array, "B R O"],
    scale: float, *, block_t: int = 128, block_o: int = 256, interpret: bool = False,
) -> Float[Array, "B T O"]:
    B, T, I = x.shape
    O = w.shape[1]
    R = a.shape[-1]
    bt, bo = min(block_t, T), min(block_o, O)
    xp, wp, bp = _pad_to(x, 1, bt), _pad_to(w, 1, bo), _pad_to(b, 2, bo)
    Tp, Op = xp.shape[1], wp.shape[1]
    out = pl.pallas_call(
        functools.partial(_kernel, scale=scale),
        grid=(B, Tp // bt, Op // bo),
        in_specs=[
            pl.BlockSpec((None, bt, I), lambda r, i, j: (r, i, 0)),
            pl.BlockSpec((I, bo), lambda r, i, j: (0, j)),
            pl.BlockSpec((None, I, R), lambda r, i, j: (r, 0, 0)),
            pl.BlockSpec((None, R, bo), lambda r, i, j: (r, 0, j)),
        ],
        out_specs=pl.BlockSpec((None, bt, bo), lambda r, i, j: (r, i, j)),
        out_shape=jax.ShapeDtypeStruct((B, Tp, Op), x.dtype),
        interpret=interpret,
    )(xp, wp, a, bp)
    return out[:, :T, :O]


def kernel_supported(mesh: jax.sharding.Mesh | None = None) -> bool:
    """Compiled Pallas runs on GPU and TPU; on CPU the model uses the reference. A pallas_call is not split
    by the SPMD partitioner, so on a multi-device mesh XLA's einsum is used."""
    return jax.default_backend() in ("gpu", "tpu") and on_one_device(mesh)
