"""The simulation engine a training run gets (server/fl/simulation_engine.py, server/fl/ray_head.py): a Ray node
and a simulation SuperLink of the run's own, `flwr run` submitting fedfleet's app to it, and nothing of either left
when the run ends, fails, or its caller is killed; and the simulated devices' ClientApp, which takes its devices
from the run config."""

from __future__ import annotations

import json
import os
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, MessageType, RecordDict

from server.datadir import DataDir
from server.errors import CoordinatorError
from server.fl.client_app import build_simulated_client_app
from server.fl.plan import TrainPlan
from server.fl.ray_head import engine_node
from server.fl.training import ENGINE_STOPPED, TEST_CLIENTAPP_ENV, run_training
from tests.server.grid import message
from tests.support import group_members, holder_process, wait_for

FLOWER_PROGRAMS = (b"flower-superlink", b"flower-superexec", b"flwr-simulation", b"server.fl.ray_head")


def _engine_processes(under: Path) -> list[int]:
    """Live processes of an engine whose state lives under `under`: the launcher, and Flower's programs whose
    FLWR_HOME is there (SuperLink, SuperExec, flwr-simulation run in sessions of their own)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state in ("Z", "X") or not any(p in argv for p in FLOWER_PROGRAMS):
            continue
        if str(under).encode() in argv or f"FLWR_HOME={under}".encode() in environ:
            found.append(int(proc.name))
    return found


@pytest.fixture
def engine_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The engines of this test keep their temporary directories under tmp_path (so their processes are told
    apart from other engines on this machine)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield tmp_path


# ----- the simulated devices' ClientApp, in this process -----


@dataclass(frozen=True)
class _Rows:
    """A data source of `n` blank examples: the named source reached the device when it holds n."""

    n: int
    name: str = "rows"

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((self.n, 64), dtype=np.float32), np.zeros(self.n, dtype=np.int64)


def source_of_partition_sizes(d: DataDir) -> Any:
    """A data source factory as `retrain.data_source` names one: device i holds 10 + i examples."""
    assert d.root.name == "data"

    def source(partition: int, partitions: int, alpha: float, seed: int) -> _Rows:
        return _Rows(10 + partition)

    return source


def _hello(app: Any, run_config: dict[str, Any], node_config: dict[str, Any]) -> ConfigRecord:
    content = RecordDict({"config": ConfigRecord({"task": "hello", "alpha": 0.5, "data-seed": 0})})
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)
    reply = app(message(content, MessageType.QUERY), context)
    client = reply.content["client"]
    assert isinstance(client, ConfigRecord)
    return client


def test_simulated_devices_are_named_consent_and_get_their_data_as_the_run_config_says(tmp_path: Path) -> None:
    # Prepare: the run config `run_training` writes for three devices, two of them consenting
    app = build_simulated_client_app()
    run_config = {
        "run-id": "run-config-test",
        "data-dir": str(tmp_path / "data"),
        "device-ids": json.dumps(["pi-a", "pi-b", "pi-c"]),
        "consenting": json.dumps(["pi-a", "pi-c"]),
        "data-source": f"{__name__}:source_of_partition_sizes",
    }

    # Execute: each virtual node greeted, as Flower's simulation names them (partition-id, num-partitions)
    hellos = [_hello(app, run_config, {"partition-id": i, "num-partitions": 3}) for i in range(3)]

    # Assert: partition i is device i, with the named source's data; the one without consent says only that
    assert [h["device-id"] for h in hellos] == ["pi-a", "pi-b", "pi-c"]
    assert [h["consent-training"] for h in hellos] == [True, False, True]
    assert [h.get("num-examples") for h in hellos] == [10, None, 12]


def test_the_simulated_devices_app_refuses_a_supernode_and_a_run_config_without_a_data_dir(tmp_path: Path) -> None:
    app = build_simulated_client_app()
    run_config = {"run-id": "r", "data-dir": str(tmp_path), "device-ids": '["pi-a"]', "consenting": '["pi-a"]'}
    # A SuperNode names its own device: the coordinator's run config must not speak for it.
    with pytest.raises(CoordinatorError, match="SuperNode"):
        _hello(app, run_config, {"device-id": "pi-real", "partition-id": 0, "num-partitions": 1})
    with pytest.raises(CoordinatorError, match="no data-dir"):
        _hello(app, {**run_config, "data-dir": ""}, {"partition-id": 0, "num-partitions": 1})


def test_a_data_source_that_cannot_load_is_refused_before_any_engine_starts(datadir: DataDir) -> None:
    with pytest.raises(CoordinatorError, match="no_such_module"):
        run_training(datadir.root, TrainPlan(rounds=1, clients=1), source_for="no_such_module:data")
    with datadir.store() as store:
        assert store.db.execute("SELECT COUNT(*) FROM fl_runs").fetchone()[0] == 0


# ----- the engine's processes -----


@pytest.mark.slow
@pytest.mark.ray
def test_an_engine_runs_a_superlink_on_its_ray_node_and_leaves_nothing_behind(engine_tmp: Path) -> None:
    import urllib.request

    state = engine_tmp / "engine"
    state.mkdir()
    with engine_node(1, state) as node:
        assert node.superlink.rsplit(":", 1)[0] == "127.0.0.1"  # plaintext, so loopback only
        with urllib.request.urlopen(f"http://{node.superlink}/health", timeout=5) as answer:
            assert answer.status == 200
        wait_for(lambda: len(_engine_processes(state)) >= 3, 60, what="launcher, SuperLink and SuperExec running")
        assert (state / "superlink.db").exists() and node.flwr_home == state / "flwr-home"
    assert _engine_processes(state) == []


@pytest.mark.slow
@pytest.mark.ray
def test_an_engine_stops_when_its_caller_is_killed(engine_tmp: Path) -> None:
    state = engine_tmp / "engine"
    state.mkdir()
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from server.fl.ray_head import engine_node\n"
        "with engine_node(1, Path(sys.argv[1])) as node:\n"
        "    print(node.superlink, flush=True)\n"
        "    time.sleep(600)\n"
    )
    with holder_process(code, str(state), what="the caller's engine") as caller:
        launcher_argv = b"-m\0server.fl.ray_head\0"
        (launcher,) = [p for p in _engine_processes(state) if launcher_argv in Path(f"/proc/{p}/cmdline").read_bytes()]
        wait_for(lambda: len(_engine_processes(state)) >= 3, 60, what="launcher, SuperLink and SuperExec running")
        os.killpg(caller.pid, signal.SIGKILL)  # no cleanup of its own: the launcher notices its stdin closed
        caller.wait(10)
        wait_for(lambda: _engine_processes(state) == [] and group_members(launcher) == [], 60, what="the engine gone")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(400)
def test_a_run_whose_clientapp_cannot_load_fails_in_one_sentence_and_leaves_nothing(
    engine_tmp: Path, datadir: DataDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: simulated devices whose ClientApp Flower cannot import (the engine fails under the ServerApp)
    monkeypatch.setenv(TEST_CLIENTAPP_ENV, "tests.server.simulated_clientapps:not_a_clientapp")
    plan = TrainPlan(rounds=1, clients=1, noise_multiplier=None, round_timeout=60.0)

    # Execute
    outcome = run_training(datadir.root, plan)

    # Assert: failed, twice (the engine failed before any round), with Flower's reason; no engine left
    assert outcome.status == "failed" and outcome.error.startswith(ENGINE_STOPPED), outcome.error
    assert "not_a_clientapp" in outcome.error
    with datadir.store() as store:
        statuses = [r[0] for r in store.db.execute("SELECT status FROM fl_runs")]
    assert statuses == ["failed", "failed"]
    assert _engine_processes(engine_tmp) == []


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(400)
def test_a_run_whose_flower_process_is_killed_before_any_round_is_tried_once_more(
    engine_tmp: Path, datadir: DataDir
) -> None:
    """The engine dying under the ServerApp without a word (its flwr-simulation process killed, say by the OOM
    killer): the SuperLink would notice only after its heartbeats, so the wait ends sooner and the run is tried
    once more on a new engine."""
    import threading

    # Prepare: the run in a thread of its own; the test kills the first run's flwr-simulation once the ServerApp
    # has recorded the run, before its first round
    outcome: list[Any] = []
    runner = threading.Thread(
        target=lambda: outcome.append(run_training(datadir.root, TrainPlan(rounds=1, clients=2, noise_multiplier=None)))
    )

    def first_run_started() -> bool:
        with datadir.store() as store:
            return bool(store.db.execute("SELECT COUNT(*) FROM fl_runs").fetchone()[0])

    # Execute
    runner.start()
    wait_for(first_run_started, 180, 0.05, what="the ServerApp recording the run")
    (simulation,) = [
        p for p in _engine_processes(engine_tmp) if b"flwr-simulation" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]
    os.kill(simulation, signal.SIGKILL)
    runner.join(300)

    # Assert: the first run recorded as failed for that reason, the second completed; nothing left
    assert outcome and outcome[0].status == "completed", outcome
    with datadir.store() as store:
        runs = {r[0]: (r[1], r[2]) for r in store.db.execute("SELECT id, status, error FROM fl_runs")}
    (failed,) = [error for status, error in runs.values() if status == "failed"]
    assert failed.startswith(ENGINE_STOPPED) and "flwr-simulation process ended" in failed
    assert len(runs) == 2 and _engine_processes(engine_tmp) == []
