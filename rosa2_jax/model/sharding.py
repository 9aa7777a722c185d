"""Logical array axes, the one table that maps them to mesh axes, and placement on a mesh.

Arrays are annotated with logical axis names (batch, embed, vocab, ...). `AXIS_RULES` maps each name
to a mesh axis (or None = replicated). Changing how a model is laid out over a mesh means editing
this table only. An axis whose size the mesh axis does not divide (SmolLM2's 9 heads on a 2-way
`model` axis, a 101-token vocabulary) is replicated instead, so every model runs on every mesh.

The algorithm's code (generation, the ROSA update) is unchanged on a mesh: its inputs are placed with
these shardings and `jax.jit` propagates them.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model")  # data: session slots; model: weights split tensor-parallel

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


def make_mesh(data: int, model: int = 1, devices: list | None = None) -> Mesh:
    """A (data, model) mesh over the first data * model of `devices` (default: this process's devices).

    Each process of a multi-process run builds its mesh from its own devices and runs its own share of
    the sessions (see rosa2_jax.distributed), so a mesh never spans processes.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    if data < 1 or model < 1 or data * model > len(devices):
        raise ValueError(f"mesh {data}x{model} needs {data * model} devices, this process has {len(devices)}; "
                         "choose data x model <= the local device count")
    return Mesh(np.array(devices[: data * model]).reshape(data, model), MESH_AXES)


def logical_to_spec(axes: Axes, rules: tuple[tuple[str, str | None], ...] = AXIS_RULES, *, mesh: Mesh | None = None,
                    extents: Mapping[str, int] | None = None) -> PartitionSpec:
    """PartitionSpec for logical `axes`; with `mesh` and `extents` (logical axis -> its size, e.g. the
    number of heads), an axis the mesh axis does not divide is replicated."""
    table = dict(rules)

    def mesh_axis(name):
        target = table.get(name) if name is not None else None
        if target is None or mesh is None or extents is None or name not in extents:
            return target
        return target if extents[name] % mesh.shape[target] == 0 else None

    return PartitionSpec(*(mesh_axis(a) for a in axes))


def named_shardings(axes_tree: Any, mesh: Mesh, extents: Mapping[str, int] | None = None) -> Any:
    """Map a pytree of logical-axes tuples to NamedShardings on `mesh`."""
    return jax.tree.map(
        lambda axes: NamedSharding(mesh, logical_to_spec(axes, mesh=mesh, extents=extents)),
        axes_tree,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def batch_sharding(x: Any, mesh: Mesh) -> NamedSharding:
    """Leading axis = batch (session slots) over `data`, every other axis replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",), mesh=mesh, extents={"batch": np.shape(x)[0]}))


def shard_batch(tree: Any, mesh: Mesh | None) -> Any:
    """Place every array of `tree` with its leading (session) axis split over `data`; no-op without a mesh."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(x, mesh)), tree)
