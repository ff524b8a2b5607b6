"""The README's main job at a small size: a fleet installs, upgrades and rolls back, every event stored."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
