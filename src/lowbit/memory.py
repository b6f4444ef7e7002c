"""Process memory: the peak resident set, and handing freed heap memory back to the OS.

glibc keeps memory that Python and torch free in its arenas, where it still counts as resident;
after a large temporary (tokenizing a whole text, a layer's activations) `release_freed_memory`
returns it, so the peak of a later phase does not stack on the garbage of an earlier one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from functools import cache


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)  # glibc only; elsewhere nothing to do


def release_freed_memory() -> None:
    """Collect garbage and return free heap pages to the OS (a no-op without glibc)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
