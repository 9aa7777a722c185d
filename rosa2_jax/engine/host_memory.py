"""What a long run's host holds beyond its arrays: compiled programs, and the C heap's freed memory.

JAX keeps the executable of every shape a jitted function has been called with until `jax.clear_caches()`: its
caches count entries (4,096), not bytes. On a CPU a 24-layer model's prefill program holds ~29 MB of host memory
and a Weights step's ~60 MB (the layers are unrolled, so the code grows with depth), and a sweep meets new shapes
for hours (prompt pieces x prompt extents, cache capacities, Weights windows x contexts). glibc keeps what was
freed (compilation's and the steps' temporaries) unless told to hand it back: 4.5 of Study 2's 11.8 GB resident.
BUILD_NOTES.md, "The engine" ("Host memory"), has the measurements.

`HostMemory.tend` releases every compiled program when the engine's jitted entry points hold more than the budget
(the ones still needed are compiled again, or loaded from the persistent compilation cache when one is set, as the
experiments do: the same programs, so no result changes), and trims the C heap at a release and once a minute.
"""

from __future__ import annotations

import ctypes
import dataclasses
import time

import jax

from rosa2_jax.adapt.rosa import hidden_offset_update, rosa_update
from rosa2_jax.model.decode_rows import decode_chunk, fit_row_cache, prefill_tokens, resize_rows, row_cache, start_row
from rosa2_jax.model.generation import generate_padded

ENTRY_POINTS = (prefill_tokens, start_row, decode_chunk, resize_rows, row_cache, fit_row_cache, generate_padded,
                rosa_update, hidden_offset_update)


def programs_held() -> int:
    """Compiled programs the engine's jitted entry points hold: one per shape (and static settings) seen."""
    return sum(fn._cache_size() for fn in ENTRY_POINTS)


def trim_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc's malloc_trim, ~0.05-0.25 s on a 5 GB fragmented heap;
    other C libraries have none)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclasses.dataclass
class HostMemory:
    """Tended once a pass of an engine's loop, between device calls, from the thread that makes them."""

    max_programs: int  # compiled programs held before all are released; 0: never
    trim_every_s: float = 60.0
    trimmed_at: float = dataclasses.field(default_factory=time.monotonic)

    def tend(self) -> bool:
        """Release the compiled programs if there are more than `max_programs`, trim the heap if that happened or a
        trim is due; whether the programs were released."""
        released = bool(self.max_programs) and programs_held() > self.max_programs
        if released:
            jax.clear_caches()
        if released or time.monotonic() - self.trimmed_at >= self.trim_every_s:
            trim_heap()
            self.trimmed_at = time.monotonic()
        return released
