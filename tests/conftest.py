from __future__ import annotations

import os
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from hypothesis import settings

from server.datadir import DataDir
from server.store import Store
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers
from simulations.processes import LOG_NAMES, descendants, kill_tree, tracebacks_in
from tests.support import Mosquitto, own_topic_prefix

# CI runs the property and fuzz tests on a fixed example sequence so a landing never hinges on a random draw;
# locally each run explores new examples (HYPOTHESIS_PROFILE=ci reproduces CI).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI") or os.environ.get("HYPOTHESIS_PROFILE") == "ci":
    settings.load_profile("ci")


# Processes that outlive the test which first asked for them (the session's Mosquitto): not leaks.
LONG_LIVED = pytest.StashKey[set[int]]()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`scripts/test.sh -n 2 --dist loadgroup`), every test that starts Flower runs on the
    same worker, so two workers never start Ray at once (each start takes every core, and its own 30 s wait) and
    a module's trained fixture is built once (xdist queues the largest unit, this group, first). First among the
    hooks: xdist's own turns the group marker into the node id's `@ray` suffix, and misses a marker added later."""
    for item in items:
        if item.get_closest_marker("ray") is not None:
            item.add_marker(pytest.mark.xdist_group("ray"))


def pytest_configure(config: pytest.Config) -> None:
    """pytest 9.2 keeps a node's id in `_id`; pytest-xdist 3.8's loadgroup still writes the group into `_nodeid`,
    so no test is grouped and two workers start Ray at once, silently. Refuse that pair (pyproject.toml pins
    pytest below 9.2)."""
    if getattr(config.option, "dist", "no") != "loadgroup":
        return
    pytest_version = tuple(int(p) for p in version("pytest").split(".")[:2])
    xdist_version = tuple(int(p) for p in version("pytest-xdist").split(".")[:2])
    if pytest_version >= (9, 2) and xdist_version <= (3, 8):
        raise pytest.UsageError(
            f"pytest {version('pytest')} with pytest-xdist {version('pytest-xdist')} does not group tests under "
            "--dist loadgroup (every Ray test would run beside another): install pytest<9.2 (scripts/setup.sh --dev)"
        )


@pytest.fixture(scope="session")
def session_mosquitto(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    assert broker.proc is not None
    pytestconfig.stash.setdefault(LONG_LIVED, set()).add(broker.proc.pid)
    yield broker
    broker.stop()


@pytest.fixture
def mosquitto(session_mosquitto: Mosquitto, request: pytest.FixtureRequest) -> Mosquitto:
    """The session's Mosquitto, with no retained message left by an earlier test (a coordinator subscribing
    to `+/status` would replay earlier tests' last wills). Only for tests marked `broker`."""
    if request.node.get_closest_marker("broker") is None:
        pytest.fail(f"{request.node.nodeid} uses Mosquitto: mark it @pytest.mark.broker", pytrace=False)
    session_mosquitto.clear_retained()
    return session_mosquitto


@pytest.fixture
def private_mosquitto(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mosquitto]:
    """A Mosquitto of this test's own, for a test that stops and restarts its broker; stopped at the end
    whatever happened. Only for tests marked `broker`."""
    if request.node.get_closest_marker("broker") is None:
        pytest.fail(f"{request.node.nodeid} uses Mosquitto: mark it @pytest.mark.broker", pytrace=False)
    broker = Mosquitto(tmp_path / "broker")
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def model_bytes() -> dict[str, bytes]:
    """Two real TFLite models of the digits shape (64 inputs, 10 classes) with different weights."""
    return {v: build_dense_model(random_dense_layers([64, 32, 10], seed)) for v, seed in (("1.0.0", 1), ("2.0.0", 2))}


@pytest.fixture
def datadir(tmp_path: Path) -> DataDir:
    """A fresh data directory whose coordinator and agents use an MQTT topic prefix of their own."""
    d, created = DataDir.init(tmp_path / "data")
    assert created
    own_topic_prefix(d)
    return d


@pytest.fixture
def lab_store(datadir: DataDir) -> Iterator[Store]:
    """The data directory's store with devices pi-1 and pi-2 (fleet lab) and release digits@1.0.0, a real TFLite
    model with a drift reference, published."""
    from tests.agent.test_telemetry import digits_reference

    s = datadir.store()
    for device in ("pi-1", "pi-2"):
        s.register_device(device, "lab", {}, {}, "test")
    model = build_dense_model(random_dense_layers([64, 16, 10], 1))
    publish_release(
        datadir.repository(), s, model, "digits", "1.0.0", extra={"drift_reference": digits_reference().to_metadata()}
    )
    yield s
    s.close()


def _process_logs(root: Path) -> Iterator[Path]:
    """Coordinator and agent logs under pytest's temporary directory (virtualenvs there are not searched)."""
    for directory, dirs, files in os.walk(root):
        if "pyvenv.cfg" in files:
            dirs[:] = []
            continue
        for name in files:
            if name in LOG_NAMES:
                yield Path(directory) / name


@pytest.fixture(autouse=True)
def no_tracebacks_in_process_logs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Fail a test whose coordinators or agents logged a Python traceback while it ran: the coordinator's
    tick logs an exception and carries on, so without this check a broken tick would pass unnoticed.
    A test that provokes one on purpose says so with `@pytest.mark.tracebacks_expected("why")`."""
    root = tmp_path_factory.getbasetemp()
    before = {log: log.stat().st_size for log in _process_logs(root)}
    yield
    if request.node.get_closest_marker("tracebacks_expected"):
        return
    found = [(log, tb) for log in _process_logs(root) for tb in tracebacks_in(log, before.get(log, 0))]
    if found:
        shown = "\n".join(f"--- {log}\n{tb}" for log, tb in found[:3])
        pytest.fail(f"{len(found)} traceback(s) in coordinator/agent logs during this test:\n{shown}", pytrace=False)


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "(gone)"


@pytest.fixture(autouse=True)
def no_process_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a process running that it started (its fixtures' teardowns included: this
    check is torn down after them), and kill it with everything it started, so it cannot disturb later tests.
    Processes of wider-scoped fixtures (the session's Mosquitto) were there before the test and stay."""
    before = set(descendants(os.getpid()))
    yield
    kept = request.config.stash.get(LONG_LIVED, set())
    left = [pid for pid in descendants(os.getpid()) if pid not in before and pid not in kept]
    if not left:
        return
    shown = "\n".join(f"  {pid}: {_command_line(pid)}" for pid in left[:10])
    for pid in left:
        kill_tree(pid)
    pytest.fail(f"{len(left)} process(es) left running by this test (now killed):\n{shown}", pytrace=False)
