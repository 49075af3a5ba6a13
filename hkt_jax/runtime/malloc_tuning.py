"""Keep freed memory in the process, so XLA:CPU's per-step buffers stop page-faulting.

Why: XLA:CPU allocates every execution's temporaries with ``malloc`` (about 290 MiB for a ResNet-20
training step at batch 128). glibc serves blocks that large with a fresh ``mmap`` and returns them with
``munmap``, so each step touches ~75,000 new pages, each one a page fault and a zeroing: about a third of
a CPU training step on a small VM. Three ``mallopt`` settings make glibc reuse that memory instead: one
arena (``M_ARENA_MAX``; XLA's worker threads would otherwise get arenas whose large blocks always fall back
to ``mmap``), no ``mmap`` for large blocks (``M_MMAP_MAX = 0``), and no trimming of the heap's top
below 1 GiB (``M_TRIM_THRESHOLD``). The cost: the process keeps its peak heap instead of returning it.

Call ``tune_malloc_for_xla()`` first thing in a CPU training program, before JAX runs anything (arenas
are created as threads first allocate). It does nothing off glibc/Linux, or when ``HKT_JAX_MALLOC_TUNING=0``.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
ARENA_MAX, MMAP_MAX, TRIM_THRESHOLD = 1, 0, 1 << 30


def glibc_tunables() -> str:
    """The same settings as a ``GLIBC_TUNABLES`` value, for child processes to start with."""
    return f"glibc.malloc.arena_max={ARENA_MAX}:glibc.malloc.mmap_max={MMAP_MAX}:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"


def tune_malloc_for_xla() -> bool:
    """Apply the settings above; True when glibc accepted all three."""
    if os.environ.get("HKT_JAX_MALLOC_TUNING", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    settings = ((M_ARENA_MAX, ARENA_MAX), (M_MMAP_MAX, MMAP_MAX), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return all(libc.mallopt(option, value) == 1 for option, value in settings)
