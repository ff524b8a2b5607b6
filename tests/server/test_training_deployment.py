"""The same Flower app on Flower's deployment engine: a SuperLink (the coordinator's side) and two SuperNodes
(two devices) on loopback, a run submitted with `flwr run`, the outcome read from the coordinator's database."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.datadir import DataDir
from server.fl.registry import Ledger, Registry, TrainingRuns
from simulations.processes import kill_tree, run_bounded
from tests.support import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ray]

APP = Path(__file__).resolve().parents[2] / "deploy" / "flower-app"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[tuple[dict[str, str], int]]:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    link_port = _free_port()
    (tmp_path / "flwr-home").mkdir()
    (tmp_path / "flwr-home" / "config.toml").write_text(
        '[superlink]\ndefault = "fedfleet"\n\n'
        f'[superlink.fedfleet]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    procs: list[subprocess.Popen[bytes]] = []
    logs = []

    def start(name: str, *args: str) -> None:
        log = (tmp_path / f"{name}.log").open("wb")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [shutil.which(args[0], path=bin_dir) or args[0], *args[1:]],
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,  # stopped with whatever it starts (the SuperLink's SuperExec)
            )
        )

    start(
        "superlink",
        "flower-superlink",
        "--insecure",
        "--host",
        "127.0.0.1",
        "--port",
        str(link_port),
        "--disable-runtime-dependency-installation",
        "--database",
        str(tmp_path / "superlink.db"),
    )
    wait_for(lambda: _port_open(link_port), 60, 0.2, what="the SuperLink listening")
    for i in range(2):
        start(
            f"supernode-{i}",
            "flower-supernode",
            "--insecure",
            "--superlink",
            f"127.0.0.1:{link_port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(_free_port()),
            "--node-config",
            f"partition-id={i} num-partitions=2 device-id='pi-{i}' state-dir='{tmp_path / 'devices'}'",
        )
    try:
        yield env, link_port
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            finally:
                kill_tree(p.pid)  # what it left behind, or all of it if it did not stop
                p.wait()
        for log in logs:
            log.close()
        # The SuperLink's SuperExec watches its parent's pid and exits on its own.


@pytest.mark.timeout(900)  # `flwr run` gets 600 s (below this) on a slow machine
def test_a_superlink_and_two_supernodes_train_and_register(
    federation: tuple[dict[str, str], int], tmp_path: Path
) -> None:
    env, _ = federation
    d, _ = DataDir.init(tmp_path / "data")
    plan = '{"rounds": 2, "clients": 2, "noise_multiplier": 1.0, "seed": 5}'
    run = run_bounded(
        [
            str(Path(sys.executable).parent / "flwr"),
            "run",
            str(APP),
            "fedfleet",
            "--stream",
            "--run-config",
            f"data-dir='{d.root}' plan='{plan}'",
        ],
        timeout=600,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    store = d.store()
    try:
        runs = TrainingRuns(store).list()
        assert [r["status"] for r in runs] == ["completed"], runs
        model = Registry(store).get(runs[0]["model_version"])
        assert model.lineage["engine"] == "deployment"
        assert model.lineage["devices"] == ["pi-0", "pi-1"]
        ledger = Ledger(store, 10.0).rows()
        assert sorted(r["device"] for r in ledger) == ["pi-0", "pi-1"] and all(r["rounds"] == 2 for r in ledger)
        assert model.lineage["metrics"]["test_accuracy"] > 0.3
    finally:
        store.close()
    # Each device kept its own record of what it spent, beside the coordinator's ledger.
    assert (tmp_path / "devices" / "pi-0" / "privacy.json").exists()
