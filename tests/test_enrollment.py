"""Enrollment mints an identity only for a name and bundle that pass: fedfleet's own names cannot be enrolled,
and a refused enrollment (here a bad fleet name) leaves no certificate, key or record behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.datadir import DataDir


def _enroll(d: DataDir, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "devices", "enroll", *args, "--data-dir", str(d.root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _certificates(d: DataDir) -> list[str]:
    with d.store() as store:
        return [r[0] for r in store.db.execute("SELECT subject FROM certificates WHERE kind = 'device'")]


@pytest.mark.parametrize(
    ("name", "fleet", "message"),
    [
        ("fedfleet-coordinator", "home", "names starting 'fedfleet-' are fedfleet's own"),
        ("fedfleet-broker", "home", "names starting 'fedfleet-' are fedfleet's own"),
        ("pi-1", "bad fleet!", "fleet 'bad fleet!' must be letters"),
    ],
)
def test_a_refused_enrollment_mints_nothing(
    datadir: DataDir, tmp_path: Path, name: str, fleet: str, message: str
) -> None:
    out = tmp_path / "bundle"
    refused = _enroll(datadir, name, "--fleet", fleet, "--out", str(out))
    assert refused.returncode == 1 and message in refused.stderr
    assert not (out / "device-key.pem").exists() and not (out / "device.pem").exists()
    assert not (out / "agent.toml").exists()
    assert _certificates(datadir) == []
    granted = _enroll(datadir, "pi-2", "--fleet", "home", "--out", str(tmp_path / "ok"))
    assert granted.returncode == 0, granted.stderr
    assert _certificates(datadir) == ["pi-2"] and (tmp_path / "ok" / "device-key.pem").is_file()
