"""Logical array axes and the one table that maps them to mesh axes.

Arrays are annotated with logical axis names (batch, embed, vocab, ...). `AXIS_RULES` maps each name
to a mesh axis (or None = replicated). Changing how a model is laid out over a mesh means editing
this table only.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# mesh axes: "data" holds session slots, "model" splits weights tensor-parallel.
AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("vocab", "model"),
    ("q_heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("embed", None),
    ("layers", None),
    ("seq", None),
    ("head_dim", None),
    ("lora_rank", None),
)

Axes = tuple[str | None, ...]


def logical_to_spec(axes: Axes, rules: tuple[tuple[str, str | None], ...] = AXIS_RULES) -> PartitionSpec:
    table = dict(rules)
    return PartitionSpec(*(table.get(a) if a is not None else None for a in axes))


def named_shardings(axes_tree: Any, mesh: Mesh) -> Any:
    """Map a pytree of logical-axes tuples to NamedShardings on `mesh`."""
    return jax.tree.map(
        lambda axes: NamedSharding(mesh, logical_to_spec(axes)),
        axes_tree,
        is_leaf=lambda x: isinstance(x, tuple),
    )
