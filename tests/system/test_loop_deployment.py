"""A real fleet's retraining: the loop's worker submits the run to a SuperLink with `flwr run`, the devices'
SuperNodes train (Flower's deployment engine, real processes on loopback), and the coordinator releases the
result and starts its rollout. Nothing in the test trains or releases: it only sends drifted telemetry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.datadir import DataDir
from server.fl.registry import Registry
from server.loop.controller import LoopController
from server.loop.retrain import FINAL
from server.store import now_ms
from server.store.loop import JobRecords
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers
from tests.server.test_loop import CLASSES, FEATURES, Telemetry, reference
from tests.server.test_training_deployment import federation  # noqa: F401 (the SuperLink and two SuperNodes)
from tests.support import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(900)]

POLICY = """[retrain]
on_drift = "retrain"
window_seconds = 60
min_devices = 2
engine = "deployment"
superlink = "127.0.0.1:{port}"
rounds = 2
target_epsilon = 3.0
"""


def test_serve_retrains_on_the_fleets_supernodes(federation: tuple[dict[str, str], int], tmp_path: Path) -> None:  # noqa: F811
    _, link_port = federation
    d, _ = DataDir.init(tmp_path / "data")
    (d.root / "policy.toml").write_text(POLICY.format(port=link_port))
    store = d.store()
    try:
        model = build_dense_model(random_dense_layers([FEATURES, 16, CLASSES], 1))
        extra = {"drift_reference": reference().to_metadata()}
        publish_release(d.repository(), store, model, "digits", "1.0.0", extra=extra)
        for device in ("pi-0", "pi-1"):  # the SuperNodes' device ids
            store.register_device(device, "home", {}, {}, "test")
            store.set_status(device, True, "digits@1.0.0", "", 1, "", "")
        assign = subprocess.run(
            [
                sys.executable,
                "-m",
                "server.cli",
                "assign",
                "--fleet",
                "home",
                "digits@1.0.0",
                "--data-dir",
                str(d.root),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert assign.returncode == 0, assign.stderr
        telemetry = Telemetry(store, devices=["pi-0", "pi-1"])
        telemetry.send(now_ms(), contrast=0.3, n=200)  # the sensors drift
        loop = LoopController(d, store, d.rollouts(store), d.policy(), d.config().epsilon_budget)
        jobs = JobRecords(store)

        def moved_on() -> bool:
            loop.tick()
            done = jobs.recent()
            return bool(done) and done[0]["state"] in ("rolling_out", *FINAL)

        wait_for(moved_on, 600, 1.0, what="the retrain job to train, release and start its rollout")
        (job,) = jobs.recent()
        wait_for(lambda: not loop.retrain.running_workers(), 60, 0.5, what="the worker to exit")
        log = (d.root / "loop" / f"job-{job['id']}.log").read_text()
        assert job["state"] == "rolling_out", f"{job}\n{log[-4000:]}"
        version = Registry(store).get(job["model_version"])
        rollout = d.rollouts(store).status(job["rollout_id"], observe=False)["spec"]
    finally:
        store.close()
    assert version.lineage["engine"] == "deployment" and version.lineage["devices"] == ["pi-0", "pi-1"]
    assert version.lineage["cause"] == job["cause"] and f"alarm {job['alarm_id']}" in job["cause"]
    assert job["release_id"] == f"digits@{version.seq}" and rollout["release"] == job["release_id"]
    assert rollout["fleet"] == "home"
