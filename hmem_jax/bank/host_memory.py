"""Keep a streamed bank's freed block arrays from staying resident (glibc malloc settings).

A streamed run allocates and frees block-sized arrays (1-1000 MB) every step
from several threads (the step's rows, store reads, materialised blocks,
write-back stacks). With glibc's defaults, freed arrays below the *dynamic*
mmap threshold (which grows to 32 MB after the first large free) stay in the
heap, and every thread gets an arena of its own that keeps what it freed: at
the 160M geometry this held 2-3 GB of freed memory resident (BENCHMARKS.md,
"Memory bank"). Fixing the mmap threshold makes every allocation of at least
`mmap_threshold` bytes its own mapping, returned to the OS when freed, and
capping the arenas bounds what small allocations can strand. Other C
libraries (musl, macOS) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_MMAP_THRESHOLD = -3  # mallopt parameters, from glibc's malloc.h
_M_ARENA_MAX = -8


@functools.cache
def return_freed_blocks_to_os(mmap_threshold: int = 1 << 20, arena_max: int = 2) -> bool:
    """Set glibc's mmap threshold and arena cap for this process; False if not glibc.

    Idempotent; call it before the first large allocations of a streamed run.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (present only in glibc)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
        mallopt(_M_ARENA_MAX, int(arena_max))
    )
