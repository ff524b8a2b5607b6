"""The agent's heap stays the same size from run to run: glibc's malloc arenas bounded (edge_agent/memory.py)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from edge_agent.memory import ARENAS

# Sixteen threads that each malloc() at once and hold it: glibc gives each thread an arena of its own (a 64 MiB-
# aligned anonymous heap) until it reaches its limit, eight per core by default. Prints the arenas besides the
# main one, as benchmarks/agent_footprint.py counts them.
THREADS = """
import ctypes, sys, threading
from pathlib import Path
if sys.argv[1] == "limited":
    from edge_agent.memory import limit_malloc
    assert limit_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
barrier = threading.Barrier(16)
held = []
def work():
    barrier.wait()
    held.append(libc.malloc(64 * 1024))
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(16)]
for t in threads: t.start()
for t in threads: t.join()
arenas = 0
for line in Path("/proc/self/maps").read_text().splitlines():
    fields = line.split()
    if len(fields) == 5 and fields[1].startswith("rw") and int(fields[0].split("-")[0], 16) % (64 << 20) == 0:
        arenas += 1
print(arenas)
"""


def _arenas(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", THREADS, mode], capture_output=True, text=True, check=True, timeout=60)
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_the_agent_bounds_malloc_arenas_however_many_threads_allocate() -> None:
    default, limited = _arenas("default"), _arenas("limited")
    assert default > ARENAS  # without the bound, threads that allocate at once each get an arena
    assert limited <= ARENAS - 1  # the main arena and one more, whatever the threads
