"""Per-row LoRA adapters: the slot through which `pi(x, theta)` depends on theta.

Row b of a batch uses its own factors: y_b = x_b W + scale * (x_b A_b) B_b, with the base W shared
(never copied per row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@struct.dataclass
class LoraAdapters:
    """factors[target] = (A [B, L, d_in, r], B [B, L, r, d_out]); scale = alpha / rank."""

    factors: dict[str, tuple[Array, Array]]
    scale: float = struct.field(pytree_node=False, default=1.0)

    def per_layer(self) -> dict[str, tuple[Array, Array]]:
        """Layer-major view [L, B, ...] for scanning over layers."""
        return {t: (jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1)) for t, (a, b) in self.factors.items()}


def lora_delta(
    x: Float[Array, "B T d_in"], a: Float[Array, "B d_in r"], b: Float[Array, "B r d_out"], scale: float
) -> Float[Array, "B T d_out"]:
    xa = jnp.einsum("bti,bir->btr", x, a.astype(x.dtype))
    return scale * jnp.einsum("btr,bro->bto", xa, b.astype(x.dtype))
