"""Giving the heap that a burst of work freed back to the system.

glibc keeps the memory that ``free`` returns inside its heap for the next ``malloc``; it
hands pages back only from the top of the main heap, so the scattered leftovers of an
indexing run (texts, batches, payloads: mostly objects too large for Python's own
allocator) stay resident while the daemon sits idle for hours. Measured on a daemon
that indexed all of SciFact from nothing: 849 MiB resident, 752 after
``malloc_trim(0)``, which gives every free page of every arena back (``madvise``).

The daemon calls :meth:`HeapTrimmer.maybe_trim` once a minute when idle: it trims only
once the process grew by :data:`GROWTH_BYTES` since the last trim, so an idle daemon
does not walk its heap every minute for nothing. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

#: Growth of the resident size since the last trim that makes the next one worth it.
GROWTH_BYTES = 32 * 2**20


def resident_bytes() -> int | None:
    """This process's resident memory (``/proc/self/statm``); None where unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another libc, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim  # the libc this process already runs on
    except (OSError, AttributeError):  # musl has none
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    result: Callable[[int], int] = fn
    return result


class HeapTrimmer:
    """Trims the heap when the process grew since it last did (see the module doc)."""

    def __init__(self, growth_bytes: int = GROWTH_BYTES) -> None:
        self.growth_bytes = growth_bytes
        self._trim = _malloc_trim()
        self._after = resident_bytes() or 0

    @property
    def available(self) -> bool:
        """Whether this process can trim (glibc on Linux)."""
        return self._trim is not None

    def maybe_trim(self) -> tuple[int, int] | None:
        """(resident bytes before, after) when it trimmed, else None. ctypes lets go of
        the GIL during the call, so other threads run (a ``malloc`` of theirs may wait
        for the arena being trimmed): 18 ms for 240 MiB given back among 450 MiB live,
        1 ms when there is nothing to give back."""
        if self._trim is None:
            return None
        before = resident_bytes()
        if before is None or before - self._after < self.growth_bytes:
            return None
        self._trim(0)
        self._after = resident_bytes() or before
        return before, self._after
