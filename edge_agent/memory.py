"""The agent's heap: small, and the same size from one run to the next.

glibc's malloc gives each thread that allocates while another holds an arena an arena of its own, up to eight per
core, and never gives one back. The agent's threads (gRPC's event engine and its lifeguard, the asyncio
executor, TFLite, MQTT) come and go with load, so how many arenas a run ends with, and how much freed memory each
keeps, depended on the run. glibc also raises its mmap threshold each time a large block is freed, after which
blocks of that size (an artifact's chunks, a model's buffers) come from the heap and stay there. The agent runs a
few threads that allocate little: two arenas serve them, and fixed thresholds send every large block to mmap, which
returns it on free.

`limit_malloc()` runs first thing in `fedfleet-agent run`, before the agent starts a thread. Outside glibc
(musl, macOS) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import logging

__all__ = ["ARENAS", "MMAP_THRESHOLD", "limit_malloc"]

logger = logging.getLogger(__name__)

# mallopt() parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

ARENAS = 2
MMAP_THRESHOLD = 128 * 1024  # glibc's starting value, now fixed: larger blocks are mmap'd and unmapped on free
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # free memory at the top of the heap past this goes back to the system


def limit_malloc(arenas: int = ARENAS) -> bool:
    """Bound glibc malloc's arenas and fix its thresholds for this process; False where libc is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        logger.debug("no mallopt in this C library; malloc left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_ARENA_MAX, arenas),
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        )
    )
    if not done:
        logger.debug("mallopt refused a setting; malloc partly left as it is")
    return done
