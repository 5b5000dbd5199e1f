"""The process's host heap (glibc malloc): hand freed pages back, bound its arenas.

Neither imports JAX (benchmark children that must not carry it can use them); on a C
library other than glibc they do nothing.
"""

from __future__ import annotations

import ctypes
import gc
import os

_M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``)."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def limit_arenas(count: int | None = None) -> bool:
    """At most ``count`` malloc arenas (default: one per CPU core; glibc's default is
    eight per core). Each thread that allocates may otherwise get its own arena, and
    what the restore's and the compiler's threads free there stays resident: on an
    8k-token SmolLM2 ``scas-jax score`` (2 cores) the peak goes from 1,073 to 1,053 MB,
    wall time unchanged. Call it before the threads that allocate start (the CLI calls it
    before JAX's backend is initialised). Returns whether the setting took."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, int(count or os.cpu_count() or 1)))
