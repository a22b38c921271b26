"""Giving freed memory back to the system.

Served shapes vary per request, and glibc keeps the heap a large request grew to: after one
40 MP image a server would hold its peak for good (measured: 1.3 GB held after a soak that
peaked at 2.4 GB; docs/benchmarks.md). `malloc_trim` returns the free part, so after work on
many pixels the service calls it. A no-op where the C library has no malloc_trim.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# Below this many pixels the heap's growth is small and trimming would cost more than it gives.
TRIM_AFTER_PIXELS = 1_000_000


def load_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to call
        return None


malloc_trim = load_trim()


def give_back_memory(pixels: int) -> bool:
    """After work on `pixels` pixels: return the heap's free memory to the system. True when
    it asked the C library to."""
    if malloc_trim is None or pixels < TRIM_AFTER_PIXELS:
        return False
    malloc_trim(0)
    return True
