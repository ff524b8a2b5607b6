"""Inference on the device: the Python API and the local endpoint, a model swap under load, and the agent
killed mid-send with windows waiting in its outbox."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent import Agent, Inference
from server.datadir import DataDir
from server.store import Release
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers
from simulations.processes import CoordinatorProcess, Mosquitto, wait_for
from tests.agent.test_telemetry import FEATURES, digits_reference
from tests.support import enroll_agent

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _releases(d: DataDir) -> dict[str, Release]:
    s = d.store()
    out = {}
    for version, seed in (("1.0.0", 1), ("2.0.0", 2)):
        model = build_dense_model(random_dense_layers([FEATURES, 16, 10], seed))
        out[version] = publish_release(
            d.repository(), s, model, "digits", version, extra={"drift_reference": digits_reference().to_metadata()}
        ).release
    s.close()
    return out


def _stored_inferences(d: DataDir) -> Counter[str]:
    s = d.store()
    rows = s.db.execute("SELECT release_id, sum(inferences) FROM telemetry GROUP BY release_id").fetchall()
    s.close()
    return Counter({r: int(n) for r, n in rows})


SERVED_EACH = 200  # inferences on each release before the swap and after it, however fast this machine is


def test_swap_under_load_fails_no_inference_and_keeps_releases_apart(
    datadir: DataDir, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    releases = _releases(datadir)
    coordinator = CoordinatorProcess(datadir, mosquitto.url).start()
    bundle = enroll_agent(
        datadir,
        tmp_path,
        "pi-swap",
        coordinator=coordinator,
        extra={"telemetry_every_inferences": 50, "local_endpoint": "off"},
    )
    served: Counter[str] = Counter()
    failures: list[BaseException] = []

    per_thread: list[Counter[str]] = []

    def hammer(agent: Agent, stop: threading.Event) -> None:
        rng = np.random.default_rng(threading.get_ident() % 2**32)
        mine: Counter[str] = Counter()  # one per thread: Counter increments are not atomic across threads
        per_thread.append(mine)
        while not stop.is_set():
            try:
                result: Inference = agent.run_inference(rng.random(FEATURES, dtype=np.float32))
                mine[result.release_id] += 1
            except Exception as e:  # any failed inference fails the test
                failures.append(e)

    def served_so_far(release: str) -> int:
        return sum(counts[release] for counts in list(per_thread))

    async def until(predicate: Callable[[], object], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
            await asyncio.sleep(0.02)

    async def scenario() -> None:
        agent = Agent(bundle.config)
        task = asyncio.create_task(agent.run())
        store = datadir.store()
        await until(lambda: store.is_device("pi-swap"), "registration")
        datadir.director().assign(store, ["pi-swap"], releases["1.0.0"])
        await until(lambda: agent.model is not None, "1.0.0 installed")
        stop = threading.Event()
        threads = [threading.Thread(target=hammer, args=(agent, stop)) for _ in range(4)]
        for t in threads:
            t.start()
        await until(lambda: served_so_far("digits@1.0.0") >= SERVED_EACH or failures, "inferences on 1.0.0")
        datadir.director().assign(store, ["pi-swap"], releases["2.0.0"])  # swapped while 4 threads infer
        store.close()
        await until(lambda: agent.running_release == "digits@2.0.0" or failures, "the swap to 2.0.0")
        await until(lambda: served_so_far("digits@2.0.0") >= SERVED_EACH or failures, "inferences on 2.0.0")
        stop.set()
        for t in threads:
            t.join()
        for counts in per_thread:
            served.update(counts)
        agent.recorder.close()  # the open window too
        deadline = time.monotonic() + 30
        while len(agent.outbox) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(scenario())
    finally:
        coordinator.kill()
    assert not failures, failures[:3]
    assert served["digits@1.0.0"] >= SERVED_EACH and served["digits@2.0.0"] >= SERVED_EACH  # counts, not rates
    assert _stored_inferences(datadir) == served  # every inference counted, in its own release's windows


def test_local_endpoint_and_agent_killed_mid_send(
    datadir: DataDir, tmp_path: Path, private_mosquitto: Mosquitto
) -> None:
    broker = private_mosquitto  # stopped and started by the test, stopped at the end whatever happens
    releases = _releases(datadir)
    coordinator = CoordinatorProcess(datadir, broker.url).start()
    agent = enroll_agent(
        datadir,
        tmp_path,
        "pi-kill",
        coordinator=coordinator,
        extra={"telemetry_every_inferences": 5, "ack_timeout": 2.0},
    )

    def infer(values: list[float]) -> dict[str, object]:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "edge_agent.cli",
                "infer",
                "--config",
                str(agent.config_path),
                "--input",
                ",".join(map(str, values)),
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        doc: dict[str, object] = json.loads(out.stdout)
        return doc

    try:
        agent.start()
        store = datadir.store()
        wait_for(lambda: store.is_device("pi-kill"), 30, what="registration")
        datadir.director().assign(store, ["pi-kill"], releases["1.0.0"])
        store.close()
        wait_for(lambda: agent.status()["release"] == "digits@1.0.0", 30, what="committed")
        wait_for(lambda: Path(agent.config.local_endpoint.removeprefix("unix:")).exists(), 10, what="socket")
        first = infer([0.5] * FEATURES)
        assert first["release"] == "digits@1.0.0" and len(first["output"]) == 10  # type: ignore[arg-type]
        bad = subprocess.run(
            [sys.executable, "-m", "edge_agent.cli", "infer", "--config", str(agent.config_path), "--input", "1,2,3"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert bad.returncode == 1 and "does not fit the model" in bad.stderr

        broker.stop()  # windows can only wait in the outbox (gRPC still works: stop the coordinator too)
        coordinator.kill()
        for i in range(19):
            infer([i / 20] * FEATURES)
        agent.kill()  # SIGKILL with windows unsent
        broker.start()
        coordinator.start()
        agent.start()
        # 1 + 19 inferences (the malformed input counts as an error): four closed windows of 5
        wait_for(lambda: sum(_stored_inferences(datadir).values()) == 20, 60, what="all 20 inferences stored")
    finally:
        agent.kill()
        coordinator.kill()
        broker.stop()
    s = datadir.store()
    rows = s.db.execute("SELECT first_sequence, sequence FROM telemetry ORDER BY sequence").fetchall()
    s.close()
    covered = [q for first, last in rows for q in range(first, last + 1)]
    assert covered == list(range(1, len(covered) + 1))  # exactly once, none missing
