"""The process's heap, tuned for a long-running generator (glibc only).

PyTorch's CPU tensors come from malloc. glibc serves blocks above its mmap threshold (128 KB at start, raised
to the largest block freed since, up to 32 MB) with fresh mmap()s and returns free memory at the top of its heap
to the system once it exceeds a trim threshold; each later allocation of that memory is a run of page faults
that zero it again. An engine step allocates the same temporaries step after step (a 4K-token prefill chunk of
the README's benchmark model: ~250,000 faults, about 1 GB zeroed per prefill; a speculative verification's saved
Mamba states, 196 KB per layer on hylm-tiny), so the engine fixes the mmap threshold at its maximum and keeps
freed memory: the memory is then reused, at the price of a resident size that stays at its high-water mark (what
an inference server's memory budget assumes anyway). Measured: the benchmark model's 4K-token prefill 3,600-3,770
-> 4,650-4,700 tok/s after warm-up (`benchmarks/bench_cpu.py`'s `hylm_prefill`, same process).

HYLM_MALLOC_TUNING=0 leaves the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # glibc's ceiling: 32 MB on 64-bit
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GB free at the heap's top

_tuned: bool | None = None


def tune_process_allocator() -> bool:
    """Apply the settings above once per process; True where they are in effect."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("HYLM_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt  # glibc (and a few others); absent on musl
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not _tuned:
        log.debug("mallopt refused the engine's heap settings; allocator left as it was")
    return _tuned
