"""glibc's allocator held steady for a long-running process that embeds on the CPU.

By default glibc gives freed memory back to the system as soon as a large enough stretch
is free, so every forward pass faults its activations in again, page by page (measured on
`e5v serve`: three times the page faults and sys time of the same calls in a fresh
process, 1.3-1.6x slower rounds). Keeping freed memory (up to a bound) and a fixed mmap
threshold turns that into reuse. Environment variables glibc reads win over this.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["keep_freed_memory"]

logger = logging.getLogger(__name__)

#: ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations at least this large are mapped on their own (glibc's largest default).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory kept at the top of the heap before glibc returns it.
TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Tune glibc's ``malloc`` as the module says; whether it was applied (not on other
    systems or C libraries, nor where ``MALLOC_TRIM_THRESHOLD_`` or
    ``MALLOC_MMAP_THRESHOLD_`` is set)."""
    if not sys.platform.startswith("linux") or any(
        name in os.environ for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
    ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    logger.debug("glibc malloc keeps freed memory: %s", applied)
    return applied
