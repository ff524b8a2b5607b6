"""The README's "Using it by hand" walkthrough, run as written (issue 23: docs checked by tests).

The ```sh block under that heading is taken from README.md and run by bash (`set -euo pipefail`) in a temporary
directory that holds what a person would have there: `.venv` (a link to this checkout's virtualenv), and
`model.tflite` and `model-v2.tflite` (two random dense models). Its `fedfleet serve &` and `fedfleet-agent run &`
are a real coordinator with its embedded broker and a real agent. The only thing added is the addresses: the
data directory is initialised first (the walkthrough's own `init` is then a no-op, as it says) and given free
loopback ports, because the defaults (:50051, :1883, :8080) may be taken on a shared machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.ingest.broker import free_port
from simulations.dense_tflite import build_dense_model, random_dense_layers
from simulations.processes import kill_tree, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HEADING = "## Using it by hand"
WALKTHROUGH_SECONDS = 240  # the whole block; each of its polls gives up after a minute of its own
DEVICE = "pi-kitchen"


def walkthrough_block(readme: Path) -> str:
    """The first ```sh block between the heading and the next `## ` heading."""
    lines = readme.read_text().splitlines()
    try:
        start = lines.index(HEADING)
    except ValueError:
        pytest.fail(f"README.md has no '{HEADING}' heading, so there is no walkthrough to run.", pytrace=False)
    body: list[str] | None = None
    for line in lines[start + 1 :]:
        if body is None:
            if line.startswith("## "):
                break
            if line.strip() == "```sh":
                body = []
        elif line.strip() == "```":
            return "\n".join(body) + "\n"
        else:
            body.append(line)
    pytest.fail(f"README.md has no complete ```sh block under '{HEADING}'.", pytrace=False)


def fedfleet(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", *args, "--data-dir", "fleet"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"fedfleet {' '.join(args)} failed: {done.stderr}"
    return done.stdout


def group_alive(pgid: int) -> bool:
    """Whether any process (zombies aside) is still in process group `pgid`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] not in ("Z", "X") and int(fields[3]) == pgid:
                return True
    return False


def test_the_by_hand_walkthrough_runs_as_written(tmp_path: Path) -> None:
    # Prepare: the block, the models, the venv where the walkthrough expects it, free addresses
    block = walkthrough_block(REPO / "README.md")
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    (tmp_path / "model.tflite").write_bytes(build_dense_model(random_dense_layers([64, 16, 10], 1)))
    (tmp_path / "model-v2.tflite").write_bytes(build_dense_model(random_dense_layers([64, 16, 10], 2)))
    fedfleet(tmp_path, "init")
    for key in ("grpc_listen", "embedded_broker_listen", "dashboard_listen"):
        fedfleet(tmp_path, "config", "set", key, f"127.0.0.1:{free_port()}")
    script = tmp_path / "walkthrough.sh"
    script.write_text("set -euo pipefail\n" + block)
    log = tmp_path / "walkthrough.log"
    env = {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    env.pop("FEDFLEET_DATA_DIR", None)

    # Execute: bash in a process group of its own, so that the background coordinator and agent (in the
    # same group: a script has no job control) are killed with it whatever happens
    started = time.monotonic()
    with log.open("wb") as out:
        bash = subprocess.Popen(
            ["bash", str(script)], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        try:
            returncode = bash.wait(WALKTHROUGH_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the walkthrough ran past {WALKTHROUGH_SECONDS} s:\n{log.read_text()[-4000:]}", pytrace=False)
        elapsed = time.monotonic() - started
        devices = json.loads(fedfleet(tmp_path, "devices", "list", "--json"))
        device = json.loads(fedfleet(tmp_path, "devices", "show", DEVICE, "--json"))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bash.pid, signal.SIGKILL)
        kill_tree(bash.pid)
        bash.wait(10)
        wait_for(lambda: not group_alive(bash.pid), 10, what="the walkthrough's processes to exit")
    output = log.read_text()

    # Assert: every command succeeded, the device took 1.1.0 and was rolled back to 1.0.0 at a higher counter
    assert returncode == 0, f"the walkthrough failed (exit {returncode}) after {elapsed:.0f} s:\n{output[-4000:]}"
    assert "Traceback" not in output, output
    assert [(d["id"], d["fleet"], d["labels"]) for d in devices] == [(DEVICE, "home", {"site": "hall"})]
    assert devices[0]["assigned_release"] == devices[0]["running_release"] == "digits@1.0.0"
    assert devices[0]["running_counter"] == 3
    committed = [(e["release_id"], e["counter"]) for e in device["events"] if e["kind"] == "committed"]
    assert sorted(committed, key=lambda c: c[1]) == [("digits@1.0.0", 1), ("digits@1.1.0", 2), ("digits@1.0.0", 3)]
