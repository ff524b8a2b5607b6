"""SIGKILL the agent at every step of an update: it restarts on a committed model and finishes the update."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.runtime import load_model
from edge_agent.state import StateStore
from edge_agent.steps import STEPS
from server.datadir import DataDir
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers
from tests.support import AgentProcess, CoordinatorProcess, Mosquitto, enroll_agent, wait_for
from tests.system.test_end_to_end import fedfleet, running


@pytest.fixture(scope="module")
def crash_models() -> dict[str, bytes]:
    return {
        "1.0.0": build_dense_model(random_dense_layers([64, 32, 10], 1)),
        # A larger second model (~1.3 MB) so the download spans several chunks and can be cut in the middle.
        "2.0.0": build_dense_model(random_dense_layers([64, 4000, 10], 2)),
    }


@pytest.fixture
def crash_fleet(
    datadir: DataDir, mosquitto: Mosquitto, crash_models: dict[str, bytes]
) -> Iterator[tuple[DataDir, CoordinatorProcess]]:
    """A coordinator of each case's own: a case's devices, assignments and events never meet another's."""
    store = datadir.store()
    for version, model in crash_models.items():
        publish_release(datadir.repository(), store, model, "digits", version)
    store.close()
    coordinator = CoordinatorProcess(datadir, mosquitto.url).start()
    yield datadir, coordinator
    coordinator.kill()


def committed_model_is_intact(state_dir: Path) -> str:
    state = StateStore(state_dir).load()
    assert state.active is not None and state.active_info is not None
    path = state_dir / "slots" / state.active / "model.tflite"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == state.active_info.sha256
    load_model(path)  # and it loads
    return state.active_info.release_id


def registered(d: DataDir, device_id: str) -> bool:
    store = d.store()
    try:
        return store.is_device(device_id)
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.parametrize("step", STEPS)
def test_kill_at_each_update_step(step: str, crash_fleet: tuple[DataDir, CoordinatorProcess], tmp_path: Path) -> None:
    d, coordinator = crash_fleet
    name = f"crash-{step.replace('_', '-')}"
    processes: list[AgentProcess] = []

    def start(**extra: str) -> AgentProcess:
        agent = enroll_agent(d, tmp_path, name, coordinator=coordinator, extra=extra).start()
        processes.append(agent)
        return agent

    try:
        first = start()
        wait_for(lambda: registered(d, name), 30, what="registration")
        fedfleet(d, "assign", name, "digits@1.0.0")
        wait_for(lambda: running(d, name, "digits@1.0.0"), 30, what="1.0.0 committed")
        first.kill()

        paused = start(debug_pause_at=step)
        fedfleet(d, "assign", name, "digits@2.0.0")
        state_dir = first.config.state_dir
        wait_for((state_dir / f"paused-at-{step}").exists, 30, what=f"pause at {step}")
        paused.kill()

        release = committed_model_is_intact(state_dir)
        assert release == ("digits@2.0.0" if step == "switched" else "digits@1.0.0")

        resumed = start()
        wait_for(
            lambda: resumed.status()["release"] == "digits@2.0.0" and not resumed.status()["update_pending"],
            30,
            what="2.0.0 after restart",
        )
        assert committed_model_is_intact(state_dir) == "digits@2.0.0"
        assert not list((state_dir / "downloads").iterdir())
        assert not list(state_dir.rglob(".tmp-*"))
    finally:
        for agent in processes:
            agent.kill()


def test_reading_the_agent_state_never_removes_a_write_in_progress(tmp_path: Path) -> None:
    """`fedfleet-agent status` reads the state while the agent may be writing it: a temp file there may be that
    write in progress (only the agent itself, at its start, clears what a killed writer left)."""
    (tmp_path / ".tmp-live").write_bytes(b"{}")
    StateStore(tmp_path).load()
    assert (tmp_path / ".tmp-live").exists()
    assert StateStore(tmp_path).remove_stale_temp_files() == 1
    assert not (tmp_path / ".tmp-live").exists()
