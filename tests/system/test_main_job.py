"""The README's main job at a small size: a fleet installs, upgrades and rolls back, every event stored."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from server.datadir import DataDir
from simulations.processes import run_bounded


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
