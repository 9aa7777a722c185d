"""Per-session LoRA adapters: the theta in pi(x, theta).

Row (session) s of a batch uses its own factors: y_s = x_s W + scale * (x_s A_s) B_s, with the base W
shared and never copied per session. Factors carry a leading session axis [S, L, ...] over all L layers;
layers outside the configured subset hold zeros in both factors, so their Jacobian is zero and the ROSA
update leaves them at zero.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Int

from rosa2_jax.model.config import ModelConfig

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Spec 1.3 defaults: rank 8, alpha 16, q and v of every layer."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "v")
    layers: tuple[int, ...] | None = None  # None = every layer

    def __post_init__(self):
        unknown = set(self.targets) - set(LORA_TARGETS)
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {sorted(unknown) or '()'} invalid; choose from {LORA_TARGETS}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def first_layer(self) -> int:
        return min(self.layers) if self.layers is not None else 0


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...] | None:
    """`all` (None), `last:N` (the top N layers, every layer when N >= L) or `I-J` (inclusive) as
    LoraConfig.layers."""
    try:
        if spec == "all":
            return None
        if spec.startswith("last:"):
            n = int(spec[5:])
            lo, hi = (max(num_layers - n, 0) if n >= 1 else -1), num_layers - 1
        else:
            lo, hi = map(int, spec.split("-"))
    except ValueError:
        lo = hi = -1
    if not 0 <= lo <= hi < num_layers:
        raise ValueError(f"LoRA layers {spec!r} invalid for a {num_layers}-layer model; use all, last:N "
                         f"(N >= 1) or I-J (0 <= I <= J < {num_layers})")
    return tuple(range(lo, hi + 1))


@struct.dataclass
class LoraAdapters:
    """factors[target] = (A [S, L, d_in, r], B [S, L, r, d_out]); scale = alpha / rank.

    Layers below `first_layer` hold zero factors: the ROSA update runs them once, without tangents.
    """

    factors: dict[str, tuple[Array, Array]]
    scale: float = struct.field(pytree_node=False, default=1.0)
    first_layer: int = struct.field(pytree_node=False, default=0)

    def per_layer(self) -> dict[str, tuple[Array, Array]]:
        """Layer-major view [L, S, ...] for scanning over layers."""
        return {t: (jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1)) for t, (a, b) in self.factors.items()}

    def from_layer(self, first: int) -> "LoraAdapters":
        """The factors of layers [first, L) only, for `decoder_hidden(layers=(first, L))`."""
        return self.replace(factors=jax.tree.map(lambda a: a[:, first:], self.factors), first_layer=0)

    @property
    def num_sessions(self) -> int:
        return next(iter(self.factors.values()))[0].shape[0]


def init_adapters(cfg: ModelConfig, lora: LoraConfig, num_sessions: int, key: jax.Array) -> LoraAdapters:
    """A ~ N(0, 1/d_in), B = 0: BA = 0 yet the Jacobian is non-zero (a literal theta = 0 would have none)."""
    layer_on = jnp.zeros((cfg.num_layers,), bool)
    layer_on = layer_on.at[jnp.asarray(lora.layers if lora.layers is not None else range(cfg.num_layers))].set(True)
    from rosa2_jax.model.params import param_table  # params -> sharding; lora stays importable below both

    table = param_table(cfg)["layers"]
    factors = {}
    for target, k in zip(lora.targets, jax.random.split(key, len(lora.targets))):
        _, d_in, d_out = table[target].shape
        a = jax.random.normal(k, (num_sessions, cfg.num_layers, d_in, lora.rank), jnp.float32) / jnp.sqrt(d_in)
        a = a * layer_on[None, :, None, None]
        factors[target] = (a, jnp.zeros((num_sessions, cfg.num_layers, lora.rank, d_out), jnp.float32))
    return LoraAdapters(factors, lora.scale, lora.first_layer())


def take_sessions(adapters: LoraAdapters, index: Int[Array, "..."]) -> LoraAdapters:
    """The factors of sessions `index` (a pool's sessions gathered into a batch)."""
    return adapters.replace(factors=jax.tree.map(lambda a: a[index], adapters.factors))


def put_sessions(adapters: LoraAdapters, index: Int[Array, "U"], batch: LoraAdapters) -> LoraAdapters:
    """`adapters` with sessions `index` replaced by the rows of `batch` (indices distinct)."""
    return adapters.replace(factors=jax.tree.map(lambda a, b: a.at[index].set(b), adapters.factors, batch.factors))

