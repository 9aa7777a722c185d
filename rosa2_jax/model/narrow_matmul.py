"""x @ w with a narrow (bfloat16) weight, float32 activations and float32 accumulation, in the value, its tangent
and its transpose alike.

JAX's own rules would compute the value as asked (`einsum(x.astype(bf16), w, preferred_element_type=f32)`), but
transpose it with the float32 cotangent against the bfloat16 weight: a mixed dot, which XLA runs by converting the
weight to float32, at the float32 rate. On this CPU a [1024, 896] x [896, 4864] product runs ~5x faster with both
operands in bfloat16 and a float32 output (YNNPACK's AMX dot) than in float32, and slower than float32 with a
bfloat16 output; so the transpose rounds the cotangent to bfloat16 and keeps the float32 output, as the value does.
TPUs multiply float32 in bfloat16 passes by default; this makes the Weights step's trunk do the same anywhere.

The weight is a constant of the derivative (the Weights step differentiates the adapters, never the base weights):
a tangent or cotangent for it is an error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jaxtyping import Array, Float

narrow_matmul_p = Primitive("narrow_matmul")


def narrow_matmul(x: Float[Array, "... i"], w: Float[Array, "i o"]) -> Float[Array, "... o"]:
    """x (float32) @ w (bfloat16): both rounded to w's dtype, summed in float32."""
    return narrow_matmul_p.bind(x, w, transpose_w=False)


def _value(x, w, *, transpose_w: bool):
    spec = "...o,io->...i" if transpose_w else "...i,io->...o"
    return jnp.einsum(spec, x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def _abstract(x, w, *, transpose_w: bool):
    if x.shape[-1] != w.shape[1 if transpose_w else 0]:
        raise TypeError(f"narrow_matmul: x {x.shape} does not match w {w.shape} (transpose_w={transpose_w})")
    return jax.core.ShapedArray(x.shape[:-1] + (w.shape[0 if transpose_w else 1],), jnp.float32)


def _jvp(primals, tangents, *, transpose_w: bool):
    x, w = primals
    dx, dw = tangents
    if type(dw) is not ad.Zero:
        raise NotImplementedError("narrow_matmul: the weight is a constant; differentiate the activations only")
    y = narrow_matmul_p.bind(x, w, transpose_w=transpose_w)
    if type(dx) is ad.Zero:
        return y, ad.Zero.from_primal_value(y)
    return y, narrow_matmul_p.bind(dx, w, transpose_w=transpose_w)


def _transpose(ct, x, w, *, transpose_w: bool):
    if ad.is_undefined_primal(w):
        raise NotImplementedError("narrow_matmul: the weight is a constant; it has no cotangent")
    if type(ct) is ad.Zero:
        return ad.Zero(x.aval), None
    return narrow_matmul_p.bind(ct, w, transpose_w=not transpose_w).astype(x.aval.dtype), None


def _batch(args, dims, *, transpose_w: bool):
    x, w = args
    bx, bw = dims
    if bw is not None:  # a weight per batch element: no shared weight to keep narrow for
        w = jnp.moveaxis(w, bw, 0)
        x = jnp.moveaxis(x, bx, 0) if bx is not None else jnp.broadcast_to(x, (w.shape[0], *x.shape))
        spec = "b...o,bio->b...i" if transpose_w else "b...i,bio->b...o"
        return jnp.einsum(spec, x.astype(w.dtype), w, preferred_element_type=jnp.float32), 0
    if bx == x.ndim - 1:
        x, bx = jnp.moveaxis(x, bx, 0), 0
    return narrow_matmul_p.bind(x, w, transpose_w=transpose_w), bx


narrow_matmul_p.def_impl(lambda x, w, *, transpose_w: _value(x, w, transpose_w=transpose_w))
narrow_matmul_p.def_abstract_eval(_abstract)
mlir.register_lowering(narrow_matmul_p, mlir.lower_fun(_value, multiple_results=False))
ad.primitive_jvps[narrow_matmul_p] = _jvp
ad.primitive_transposes[narrow_matmul_p] = _transpose
batching.primitive_batchers[narrow_matmul_p] = _batch


def weight_matmul(x: Float[Array, "... i"], w: Float[Array, "i o"]) -> Float[Array, "... o"]:
    """x @ w, through `narrow_matmul` when the weight is narrower than the activations (the Weights step's bfloat16
    trunk, `decoder.narrow_trunk`, or bfloat16 decode weights kept [in, out] on an accelerator)."""
    if jnp.dtype(w.dtype).itemsize < jnp.dtype(x.dtype).itemsize:
        return narrow_matmul(x, w)
    return x @ w
