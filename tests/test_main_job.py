"""The README's main job at a small size: a fleet installs, upgrades and rolls back, every event stored."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.datadir import DataDir


def test_update_path_demo_completes(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "simulations.update_path", "--devices", "6", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "events stored: 60, refusals or failures: 0" in out.stdout
    store = DataDir(tmp_path / "demo" / "data").store()
    rows = store.devices()
    store.close()
    assert len(rows) == 6 and {r["running_release"] for r in rows} == {"digits@1.0.0"}
    assert all(r["running_counter"] == 3 for r in rows)


def test_rollout_demo_promotes_the_healthy_update_and_reverts_the_broken_build(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "simulations.rollout_demo", "--devices", "6", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    store = DataDir(tmp_path / "demo" / "data").store()
    phases = [r["phase"] for r in store.db.query("SELECT phase FROM rollouts ORDER BY id")]
    running = {r["running_release"] for r in store.devices()}
    store.close()
    assert phases == ["completed", "rolled_back"]
    assert running == {"digits@1.1.0"}  # the healthy update stayed; the broken build was reverted everywhere


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _run_or_dump_stacks(cmd: list[str], keep: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run the demo; if it overruns, have it and its coordinator print every thread's stack (SIGUSR1, see
    server.cli.main) and fail with those, so a hang says where it hung."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        children = _children(proc.pid)
        for pid in [proc.pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        time.sleep(3)
        proc.kill()
        for pid in children:  # the coordinator runs in a process group of its own
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        serve_log = keep / "data" / "serve.log"
        coordinator = serve_log.read_text()[-6000:] if serve_log.exists() else "(no serve.log)"
        pytest.fail(
            f"the demo ran past {timeout:.0f} s\n--- stdout\n{stdout[-3000:]}\n--- stderr (stacks)\n"
            f"{stderr[-12000:]}\n--- coordinator log (stacks)\n{coordinator}"
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fedfleet_demo_closes_the_loop(tmp_path: Path) -> None:
    """`fedfleet demo` small: train, release, install, drift, alarm, retrain within budget, gated rollout."""
    keep, report = tmp_path / "keep", tmp_path / "report"
    args = ["demo", "--devices", "6", "--rounds", "2", "--report", str(report), "--keep", str(keep)]
    out = _run_or_dump_stacks([sys.executable, "-m", "simulations.cli", *args], keep, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert {p.name for p in report.iterdir()} >= {"summary.md", "accuracy-and-epsilon.png", "drift-over-time.png"}
    d = DataDir(keep / "data")
    store = d.store()
    try:
        running = {r["running_release"] for r in store.devices()}
        actions = [r["action"] for r in store.db.query("SELECT action FROM audit ORDER BY seq")]
        parent = store.db.execute("SELECT parent FROM models WHERE version = 'digits@2'").fetchone()[0]
        lifetime = store.db.execute(
            "SELECT MAX(total) FROM (SELECT device_id, SUM(eps) AS total FROM ("
            "SELECT device_id, run_id, MAX(epsilon) AS eps FROM privacy_spend GROUP BY device_id, run_id)"
            " GROUP BY device_id)"
        ).fetchone()[0]
        phase = store.db.execute("SELECT phase FROM rollouts").fetchone()[0]
    finally:
        store.close()
    assert running == {"digits@2"} and phase == "completed" and parent == "digits@1"
    assert "drift.alarm" in actions and "retrain.decided" in actions
    assert actions.index("drift.alarm") < actions.index("retrain.decided") < len(actions) - 1
    assert 0 < lifetime <= d.config().epsilon_budget  # two runs of target ε 3 each, within the budget of 10
