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
from simulations.processes import descendants, run_bounded


@pytest.mark.slow
def test_update_path_demo_completes(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "simulations.update_path", "--devices", "6", "--out", str(tmp_path / "demo")]
    out = run_bounded(cmd, timeout=240)  # below pytest's 300 s; an overrun kills the demo and its coordinator
    assert out.returncode == 0, out.stdout + out.stderr
    assert "events stored: 60, refusals or failures: 0" in out.stdout
    store = DataDir(tmp_path / "demo" / "data").store()
    rows = store.devices()
    store.close()
    assert len(rows) == 6 and {r["running_release"] for r in rows} == {"digits@1.0.0"}
    assert all(r["running_counter"] == 3 for r in rows)


@pytest.mark.slow
def test_rollout_demo_promotes_the_healthy_update_and_reverts_the_broken_build(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a person's file")
    refused = run_bounded([sys.executable, "-m", "simulations.rollout_demo", "--out", str(tmp_path / "mine")], 60)
    assert refused.returncode == 1 and "holds files this demo did not write" in refused.stdout, refused.stdout
    assert (tmp_path / "mine" / "notes.txt").read_text() == "a person's file"
    cmd = [sys.executable, "-m", "simulations.rollout_demo", "--devices", "6", "--out", str(tmp_path / "demo")]
    out = run_bounded(cmd, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    store = DataDir(tmp_path / "demo" / "data").store()
    phases = [r["phase"] for r in store.db.query("SELECT phase FROM rollouts ORDER BY id")]
    running = {r["running_release"] for r in store.devices()}
    store.close()
    assert phases == ["completed", "rolled_back"]
    assert running == {"digits@1.1.0"}  # the healthy update stayed; the broken build was reverted everywhere


def _run_or_dump_stacks(cmd: list[str], keep: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run the demo; if it overruns, have it and its coordinator print every thread's stack (SIGUSR1, see
    server.cli.main) and fail with those, so a hang says where it hung. Either way nothing is left running."""

    def dump_stacks(proc: subprocess.Popen[str]) -> None:
        for pid in [proc.pid, *descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        time.sleep(3)  # only on the way to failing: time for the stacks to be written

    try:
        return run_bounded(cmd, timeout, on_timeout=dump_stacks)
    except subprocess.TimeoutExpired as e:
        serve_log = keep / "data" / "serve.log"
        coordinator = serve_log.read_text()[-6000:] if serve_log.exists() else "(no serve.log)"
        pytest.fail(
            f"the demo ran past {timeout:.0f} s\n--- stdout\n{str(e.stdout)[-3000:]}\n--- stderr (stacks)\n"
            f"{str(e.stderr)[-12000:]}\n--- coordinator log (stacks)\n{coordinator}"
        )


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)  # the demo gets 600 s (below this) to finish on a slow machine
def test_fedfleet_demo_closes_the_loop(tmp_path: Path) -> None:
    """`fedfleet demo` small: train, release, install, drift, alarm, retrain within budget, gated rollout."""
    keep, report = tmp_path / "keep", tmp_path / "report"
    args = ["demo", "--devices", "6", "--rounds", "2", "--report", str(report), "--keep", str(keep)]
    out = _run_or_dump_stacks([sys.executable, "-m", "simulations.cli", *args], keep, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert {p.name for p in report.iterdir()} >= {"summary.md", "accuracy-and-epsilon.png", "drift-over-time.png"}
    d = DataDir(keep / "data")
    token = d.operator_token()
    assert token in out.stdout  # told on the terminal, where the person running the demo reads it ...
    assert token not in (report / "summary.md").read_text()  # ... never in the report they may share
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
