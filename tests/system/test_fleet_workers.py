"""A fleet split over worker processes (simulations/fleet_worker.py): disjoint device ranges, every device
registers, goes online and commits a fleet-wide assignment; SIGTERM stops a worker cleanly (devices offline)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.datadir import DataDir
from server.trust.releases import publish_release
from simulations.fleet_worker import spawn_workers, stop_workers
from simulations.models import ModelFamily
from tests.support import CoordinatorProcess, wait_for

pytestmark = pytest.mark.slow


def test_two_workers_make_one_fleet(datadir: DataDir, tmp_path: Path) -> None:
    store = datadir.store()
    publish_release(datadir.repository(), store, ModelFamily().base(), "digits", "1.0.0")
    store.close()
    coordinator = CoordinatorProcess(datadir, None).start()
    workers = spawn_workers(
        datadir, tmp_path, "big", 8, 2, coordinator.endpoints["grpc"], coordinator.endpoints["mqtt"]
    )
    store = datadir.store()
    try:
        online = "SELECT id FROM devices WHERE fleet = 'big' AND online = 1 ORDER BY id"
        wait_for(lambda: len(store.db.execute(online).fetchall()) == 8, 60, 0.2, what="8 devices online")
        assert [r[0] for r in store.db.execute(online)] == [f"big-{i:05d}" for i in range(8)]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "server.cli",
                "assign",
                "--fleet",
                "big",
                "digits@1.0.0",
                "--data-dir",
                str(datadir.root),
            ],
            check=True,
            capture_output=True,
        )
        running = "SELECT COUNT(*) FROM devices WHERE fleet = 'big' AND running_release = 'digits@1.0.0'"
        wait_for(lambda: store.db.execute(running).fetchone()[0] == 8, 60, 0.2, what="8 devices committed")
        workers[1].terminate()
        assert workers[1].wait(30) == 0
        offline = "SELECT id FROM devices WHERE fleet = 'big' AND online = 0 ORDER BY id"
        wait_for(lambda: len(store.db.execute(offline).fetchall()) == 4, 30, 0.2, what="worker 2's devices offline")
        assert [r[0] for r in store.db.execute(offline)] == [f"big-{i:05d}" for i in range(4, 8)]
    finally:
        store.close()
        stop_workers(workers)
        coordinator.kill()
