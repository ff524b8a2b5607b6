"""One coordinator per data directory: a second `fedfleet serve` on it stops before it binds anything and names
the process that serves; once that one is gone (even SIGKILLed) a new one starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from server.datadir import DataDir
from simulations.processes import CoordinatorProcess

pytestmark = pytest.mark.slow


def test_a_second_serve_on_the_same_data_directory_refuses_to_start(datadir: DataDir) -> None:
    first = CoordinatorProcess(datadir, None).start()
    try:
        assert first.proc is not None
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "server.cli",
                "serve",
                "--data-dir",
                str(datadir.root),
                "--grpc",
                "127.0.0.1:0",
                "--broker-listen",
                "127.0.0.1:0",
                "--dashboard",
                "",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 1
        assert f"a coordinator (pid {first.proc.pid}) already serves" in second.stderr
        assert first.proc.poll() is None  # the first one serves on, untouched
    finally:
        first.kill()  # SIGKILL, and reaped
    again = CoordinatorProcess(datadir, None).start()  # the kernel dropped the lock with the killed process
    again.kill()
