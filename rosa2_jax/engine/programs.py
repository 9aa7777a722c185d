"""The compiled programs a long run holds, kept within a budget.

JAX keeps the executable of every shape a jitted function has been called with until `jax.clear_caches()`: its
caches count entries (4,096), not bytes. On a CPU a 24-layer model's prefill program holds ~29 MB of host memory
and a Weights step's ~60 MB (the layers are unrolled, so the code grows with depth), and a sweep meets new shapes
for hours (prompt pieces x cache capacities, Weights windows x contexts; BUILD_NOTES.md, "Compiled programs"). `release_programs` releases every compiled program
when the engine's jitted entry points hold more than its budget; the ones still needed are compiled again, or
loaded from the persistent compilation cache when one is set (the experiments set it). The same programs come
back, so no result changes. glibc keeps what was freed (compilation's own temporaries too) unless told to hand it
back, so a release also trims the heap.
"""

from __future__ import annotations

import ctypes

import jax

from rosa2_jax.adapt.rosa import hidden_offset_update, rosa_update
from rosa2_jax.model.decode_rows import decode_chunk, prefill_row, put_row_cache, resize_rows, row_cache
from rosa2_jax.model.generation import generate_padded

ENTRY_POINTS = (prefill_row, decode_chunk, resize_rows, row_cache, put_row_cache, generate_padded, rosa_update,
                hidden_offset_update)


def programs_held() -> int:
    """Compiled programs the engine's jitted entry points hold: one per shape (and static settings) seen."""
    return sum(fn._cache_size() for fn in ENTRY_POINTS)


def release_programs(limit: int) -> bool:
    """Release every compiled program if the entry points hold more than `limit` (0: never); whether it did. Call it
    between device calls, from the thread that makes them."""
    if not limit or programs_held() <= limit:
        return False
    jax.clear_caches()
    _trim_heap()
    return True


def _trim_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc's malloc_trim; other C libraries have none)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
