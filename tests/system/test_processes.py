"""The process helpers the tests lean on: a whole tree is killed, sessions of its own included; an overrun
command leaves nothing behind; tracebacks are found in logs from a given offset."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.processes import descendants, kill_tree, run_bounded, tracebacks_in, wait_for

# A child that starts a grandchild in a session of its own (as a demo starts its coordinator), writes the
# grandchild's pid to a file, and waits.
PARENT = """
import subprocess, sys, time
from pathlib import Path
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
Path(sys.argv[1]).write_text(str(child.pid))
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_kill_tree_kills_a_grandchild_in_a_session_of_its_own(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(pid_file)], start_new_session=True)
    try:
        wait_for(pid_file.exists, 30, what="the grandchild started")
        grandchild = int(pid_file.read_text())
        assert grandchild in descendants(parent.pid)  # the control: it is there, and found
        kill_tree(parent.pid)
        assert parent.wait(10) == -9
        wait_for(lambda: _gone(grandchild), 10, what="the grandchild killed")
    finally:
        kill_tree(parent.pid)
        parent.wait(10)


def test_run_bounded_kills_everything_an_overrunning_command_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    started: list[int] = []

    def note_tree(proc: subprocess.Popen[str]) -> None:
        wait_for(pid_file.exists, 30, what="the grandchild started")  # the overrun may come before it
        started.extend([proc.pid, *descendants(proc.pid)])

    with pytest.raises(subprocess.TimeoutExpired):
        run_bounded([sys.executable, "-c", PARENT, str(pid_file)], timeout=1, on_timeout=note_tree)
    assert int(pid_file.read_text()) in started
    for pid in started:
        wait_for(lambda pid=pid: _gone(pid), 10, what=f"process {pid} killed")  # type: ignore[misc]


def test_run_bounded_returns_what_a_command_printed() -> None:
    done = run_bounded(
        [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], 60
    )
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")


@pytest.mark.tracebacks_expected("the log under test holds tracebacks on purpose")
def test_tracebacks_are_found_after_the_offset_only(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    first = "Traceback (most recent call last):\n  File 'a'\nValueError: old\n"
    log.write_text(first + "fine\n")
    assert len(tracebacks_in(log)) == 1
    assert tracebacks_in(log, len(first) + 5) == []
    with log.open("a") as f:
        f.write("Traceback (most recent call last):\nKeyError: new\nTraceback (most recent call last):\nOSError\n")
    found = tracebacks_in(log, len(first) + 5)
    assert len(found) == 2 and "KeyError: new" in found[0] and "OSError" in found[1]
    assert tracebacks_in(tmp_path / "absent.log") == []


def test_kill_tree_spares_the_callers_own_process_group() -> None:
    """A child started without a session of its own (as Ray's are by an in-process training run) shares the
    caller's process group; killing it must not kill that group, which holds pytest and CI's shell."""
    child = subprocess.Popen(["sleep", "60"])
    assert os.getpgid(child.pid) == os.getpgrp()
    kill_tree(child.pid)
    assert child.wait(10) == -signal.SIGKILL  # the child is gone, and this test still runs
