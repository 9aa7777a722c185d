"""Run experiments.math_sweep in this process, logging memory once a minute from the main thread (after a decode
call) and releasing compiled programs / trimming glibc's heap; touches no computation."""
import ctypes
import sys
import time

import jax
from absl import app

from experiments import math_sweep
from rosa2_jax.adapt.rosa import hidden_offset_update, rosa_update
from rosa2_jax.engine import rows
from rosa2_jax.model.decode_rows import decode_chunk, prefill_row, put_row_cache, resize_rows, row_cache
from rosa2_jax.model.generation import generate_padded

LOG = "/work/probe/memlog.txt"
MAX_PROGRAMS = 64  # main's engine default (engine/host_memory.py)
ENTRY_POINTS = (prefill_row, decode_chunk, resize_rows, row_cache, put_row_cache, generate_padded, rosa_update,
                hidden_offset_update)


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2


def rss_gb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 2**20
    return 0.0


last = [0.0]
original = rows.DecodeBatch.decode


def decode(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    now = time.time()
    if now - last[0] >= 60:
        last[0] = now
        info = libc.mallinfo2()
        in_use = info.uordblks + info.hblkhd
        programs = sum(fn._cache_size() for fn in ENTRY_POINTS)
        before = rss_gb()
        action = f"programs={programs}"
        if programs > MAX_PROGRAMS:
            jax.clear_caches()
            action += " cleared"
        libc.malloc_trim(0)
        action += f" trimmed {before:.2f}->{rss_gb():.2f}"
        with open(LOG, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} rss_anon={rss_gb():.2f}GB in_use={in_use / 2**30:.2f}GB "
                    f"free_held={info.fordblks / 2**30:.2f}GB {action}\n")
    return out


rows.DecodeBatch.decode = decode

if __name__ == "__main__":
    sys.argv[0] = "math_sweep"
    app.run(math_sweep.main)
