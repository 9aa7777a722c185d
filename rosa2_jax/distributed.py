"""Multi-process runs: start-up through jax.distributed, each process's share of the work, barriers.

Sessions are independent, so processes do not run in lockstep: each process builds a mesh over its own
devices (sharding.make_mesh), takes every `count`-th problem, writes its own records, and meets the
others only at barriers (start, end). A slow host therefore never stalls the rest at every turn, and a
process that is killed resumes its own share. The price: a model must fit one host's devices.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, TypeVar

import jax

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    index: int
    count: int

    @property
    def is_main(self) -> bool:
        return self.index == 0


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> ProcessInfo:
    """`jax.distributed.initialize`; arguments left None are read from the environment (TPU pods, SLURM,
    Open MPI, Kubernetes, or JAX_COORDINATOR_ADDRESS). Call before any other JAX work."""
    # CPU processes talk over gloo (the barrier below is a cross-process collective).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=timeout_s)
    except (ValueError, RuntimeError) as e:
        raise RuntimeError(
            f"jax.distributed.initialize failed ({e}). Pass --coordinator_address=HOST:PORT (process 0's "
            "address, the same on every process), --num_processes and --process_id, or run under a cluster "
            "launcher JAX detects (TPU pod, SLURM, Open MPI)."
        ) from e
    return process_info()


def process_info() -> ProcessInfo:
    return ProcessInfo(jax.process_index(), jax.process_count())


def share(items: Sequence[T], info: ProcessInfo) -> list[T]:
    """This process's items: every `count`-th, starting at its index (balanced, and stable under resume
    as long as every process sees the same list)."""
    return list(items[info.index::info.count])


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def local_checkpointer():
    """An orbax checkpointer this process uses alone. A process restores its own copy of the params
    (its mesh spans only its devices) and the built-in conversion is done by whichever process holds
    the cache lock, so orbax must not wait for the other processes."""
    import orbax.checkpoint as ocp

    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"process{me}"))
