"""Telemetry: windows are stored exactly once, confirmed by a contiguous watermark, never lost, and hostile
windows are refused and stored nowhere."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent import outbox as outbox_module
from edge_agent.agent import Agent
from edge_agent.contract import LIMITS
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.drift import DriftReference, WindowCounts, score_window
from edge_agent.contract.windows import ClosedWindow, window_to_proto
from edge_agent.outbox import Outbox
from edge_agent.telemetry import TelemetryRecorder
from server.datadir import DataDir
from server.ingest.events import EventRejected
from server.ingest.telemetry import ingest_window, parse_window, pool, watermark
from server.store import Store
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers
from simulations.processes import CoordinatorProcess, Mosquitto
from tests.support import enroll_agent

FEATURES, CLASSES = 64, 10


def digits_reference(seed: int = 0) -> DriftReference:
    return DriftReference.from_samples(np.random.default_rng(seed).random((4000, FEATURES)), CLASSES)


def window(ref: DriftReference, n: int, seed: int, release: str = "digits@1.0.0") -> ClosedWindow:
    rng = np.random.default_rng(seed)
    counts = WindowCounts.empty(ref)
    logits = rng.normal(0, 1, (n, CLASSES))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    counts.add(ref, rng.random((n, FEATURES)), probs, rng.exponential(2.0, n))
    return ClosedWindow(release, 1000 * seed, 1000 * seed + 500, counts)


def test_outbox_keeps_windows_until_acknowledged_and_survives_reopening(tmp_path: Path) -> None:
    ref = digits_reference()
    box = Outbox(tmp_path / "o.db", "pi-1")
    assert [box.append(window(ref, 5, i)) for i in range(1, 5)] == [1, 2, 3, 4]
    box.mark_sent([1, 2, 3])
    assert box.acknowledge(2) == 2 and [s for s, _ in box.pending()] == [3, 4]
    # A forged ack above what was sent is ignored: window 3 was sent but may not be stored yet, so it stays.
    assert box.acknowledge(10**12) == 0 and box.acknowledged == 2
    assert [s for s, _ in box.pending()] == [3, 4]
    assert box.acknowledge(3) == 1 and [s for s, _ in box.pending()] == [4]
    box.close()
    again = Outbox(tmp_path / "o.db", "pi-1")
    assert [s for s, _ in again.pending()] == [4] and again.acknowledged == 3
    assert again.append(window(ref, 5, 9)) == 5  # the sequence continues after a restart


def test_outbox_summaries_stay_within_the_span_the_coordinator_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "LIMITS", dataclasses.replace(LIMITS, telemetry_summary_span=3))
    ref = digits_reference()
    box = Outbox(tmp_path / "o.db", "pi-1", cap=2)
    for i in range(1, 11):
        box.append(window(ref, 5, i))
    msgs = [pb.TelemetryWindow.FromString(p) for _, p in box.pending()]
    assert max(m.sequence - m.first_sequence + 1 for m in msgs) == 3  # merged up to the span, never past it
    assert len(msgs) > 2  # past the cap rather than lose a count or break the span
    covered = [s for m in msgs for s in range(m.first_sequence, m.sequence + 1)]
    assert covered == list(range(1, 11)) and sum(m.inferences for m in msgs) == 50


def test_full_outbox_summarizes_unsent_windows_and_loses_no_count(tmp_path: Path) -> None:
    ref = digits_reference()
    box = Outbox(tmp_path / "o.db", "pi-1", cap=3)
    box.append(window(ref, 7, 1))
    box.mark_sent([1])  # sent windows are never merged: a resend must be byte-identical
    for i in range(2, 9):
        box.append(window(ref, 7 + i, i))
    msgs = [pb.TelemetryWindow.FromString(p) for _, p in box.pending()]
    assert len(msgs) <= 3
    assert (msgs[0].first_sequence, msgs[0].sequence, msgs[0].inferences) == (1, 1, 7)
    covered = [s for m in msgs for s in range(m.first_sequence, m.sequence + 1)]
    assert covered == list(range(1, 9))  # every sequence covered once, in order
    assert sum(m.inferences for m in msgs) == sum(7 + i for i in range(1, 9)) - 1  # 7 + (9 + ... + 15)


@pytest.fixture
def store(datadir: DataDir) -> Store:
    s = datadir.store()
    s.register_device("pi-1", "lab", {}, {}, "t")
    s.register_device("pi-2", "lab", {}, {}, "t")
    model = build_dense_model(random_dense_layers([FEATURES, 16, CLASSES], 1))
    publish_release(
        datadir.repository(), s, model, "digits", "1.0.0", extra={"drift_reference": digits_reference().to_metadata()}
    )
    return s


def test_windows_are_stored_once_and_the_watermark_is_contiguous(store: Store) -> None:
    ref = digits_reference()

    def send(seq: int, first: int | None = None) -> tuple[bool, int]:
        msg = window_to_proto(window(ref, 40, seq), "pi-1", seq, first)
        r = ingest_window(store, parse_window(msg.SerializeToString()), "pi-1", "mqtt")
        return r.stored, r.watermark

    assert send(1) == (True, 1)
    assert send(3) == (True, 1)  # 2 is missing: the device must keep 3 until 2 arrives
    assert send(2) == (True, 3)
    assert send(2) == (False, 3)  # a resend changes nothing and is confirmed again
    assert send(6, first=4) == (True, 6)  # a summary of 4..6
    with pytest.raises(EventRejected, match="overlaps"):
        send(7, first=5)
    rows = store.db.execute("SELECT count(*), sum(inferences) FROM telemetry").fetchone()
    assert rows == (4, 160) and watermark(store, "pi-1") == 6
    pooled = pool(store, "digits@1.0.0")
    assert pooled.windows == 4 and pooled.score is not None and pooled.score.max_psi < 0.3


def _bad(ref: DriftReference, **change: object) -> bytes:
    msg = window_to_proto(window(ref, 20, 1), "pi-1", 1)
    for k, v in change.items():
        if k == "features":  # a window without feature counts, for a release whose reference has 64
            del msg.feature_bins[:], msg.feature_nan[:], msg.feature_out_of_range[:]
        else:
            setattr(msg, k, v)
    return msg.SerializeToString()


@pytest.mark.parametrize(
    ("payload", "topic_device", "reason"),
    [
        (lambda r: b"\xff\x00garbage", "pi-1", "not a valid TelemetryWindow"),
        (lambda r: b"x" * 300_000, "pi-1", "exceeds"),
        (_bad, "pi-2", "sent on 'pi-2'"),
        (lambda r: _bad(r, device_id="ghost"), None, "has not registered"),
        (lambda r: _bad(r, inferences=2**60), "pi-1", "absurdly large"),
        (lambda r: _bad(r, entropy_sum=-1.0), "pi-1", "non-negative"),
        (lambda r: _bad(r, inferences=21), "pi-1", "do not add up"),
        (lambda r: _bad(r, first_sequence=5), "pi-1", "inverted"),
        # One window covering a million sequence numbers would make every real window after it "overlapping".
        (lambda r: _bad(r, first_sequence=1, sequence=1_000_000), "pi-1", "summarizes at most 10000 windows"),
        # Nor may a window lie beyond what a full outbox of the widest summaries could hold.
        (lambda r: _bad(r, first_sequence=10**12, sequence=10**12), "pi-1", "beyond what the device's outbox"),
        (lambda r: _bad(r, release_id="evil@6.6.6"), "pi-1", "unknown release"),
        (lambda r: _bad(r, features=[]), "pi-1", "feature bins"),
    ],
)
def test_malformed_windows_are_rejected_and_stored_nowhere(store: Store, payload, topic_device, reason) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(EventRejected, match=reason):
        ingest_window(store, parse_window(payload(digits_reference())), topic_device, "mqtt")
    assert store.db.execute("SELECT count(*) FROM telemetry").fetchone()[0] == 0
    assert watermark(store, "pi-1") == 0


@pytest.mark.slow
@pytest.mark.broker
def test_every_window_is_stored_exactly_once_through_outages(
    datadir: DataDir, tmp_path: Path, private_mosquitto: Mosquitto
) -> None:
    """Broker stopped while inferring, the coordinator SIGKILLed and restarted, the agent stopped mid-send and
    restarted: at the end every window the agent made is stored exactly once, and every inference is counted."""
    broker = private_mosquitto  # stopped and started by the test, stopped at the end whatever happens
    s = datadir.store()
    model = build_dense_model(random_dense_layers([FEATURES, 16, CLASSES], 1))
    release = publish_release(
        datadir.repository(), s, model, "digits", "1.0.0", extra={"drift_reference": digits_reference().to_metadata()}
    ).release
    s.close()
    coordinator = CoordinatorProcess(datadir, broker.url).start()
    bundle = enroll_agent(
        datadir,
        tmp_path,
        "pi-1",
        coordinator=coordinator,
        extra={"telemetry_every_inferences": 20, "bulk_upload_after": 8},
    )
    rng = np.random.default_rng(3)
    inferred = 0

    async def infer(agent: Agent, n: int) -> None:
        nonlocal inferred
        for _ in range(n):
            agent.infer(rng.random((1, FEATURES), dtype=np.float32))
            inferred += 1
            if inferred % 10 == 0:
                await asyncio.sleep(0.01)

    async def until(predicate, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    async def scenario() -> int:
        agent = Agent(bundle.config)
        task = asyncio.create_task(agent.run())
        await until(agent.connected.is_set, "agent connected")
        store = datadir.store()
        await until(lambda: store.is_device("pi-1"), "registration")
        datadir.director().assign(store, ["pi-1"], release)
        store.close()
        await until(lambda: agent.model is not None, "model committed")

        await infer(agent, 100)  # 5 windows over MQTT
        await until(lambda: len(agent.outbox) == 0, "first windows confirmed")

        broker.stop()  # the broker goes away while the device keeps inferring
        await infer(agent, 200)
        await until(lambda: not agent.connected.is_set(), "the agent to notice the outage")
        broker.start()
        await infer(agent, 60)
        await until(lambda: len(agent.outbox) == 0, "backlog confirmed after the outage")

        await asyncio.to_thread(coordinator.kill)  # SIGKILL the coordinator mid-stream
        await infer(agent, 100)
        await asyncio.to_thread(coordinator.start)
        await infer(agent, 40)
        await until(lambda: len(agent.outbox) == 0, "windows confirmed after a coordinator restart")

        broker.stop()
        await infer(agent, 80)  # windows wait in the outbox ...
        task.cancel()  # ... and the agent is stopped mid-send
        await asyncio.gather(task, return_exceptions=True)
        broker.start()
        again = Agent(bundle.config)
        task = asyncio.create_task(again.run())
        await infer(again, 20)
        await until(lambda: len(again.outbox) == 0, "windows confirmed after the agent restarted", 45)
        made = again.outbox.acknowledged
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return made

    try:
        made = asyncio.run(scenario())
    finally:
        coordinator.kill()
        broker.stop()
    store = datadir.store()
    rows = store.db.execute(
        "SELECT first_sequence, sequence, inferences FROM telemetry WHERE device_id = 'pi-1' ORDER BY sequence"
    ).fetchall()
    store.close()
    covered = [q for first, last, _ in rows for q in range(first, last + 1)]
    assert covered == list(range(1, made + 1)), "every window stored exactly once, none missing"
    assert sum(n for *_, n in rows) == inferred == 600
    assert json.loads(json.dumps(made)) >= 30


def test_a_recorded_window_pools_to_the_score_of_its_own_counts(store: Store, datadir: DataDir) -> None:
    closed: list[ClosedWindow] = []
    recorder = TelemetryRecorder(closed.append, every_inferences=300, every_seconds=3600)
    recorder.switch("digits@1.0.0", digits_reference())
    rng = np.random.default_rng(5)
    for _ in range(300):
        x = rng.random((1, FEATURES)) + 0.3  # drifted inputs
        recorder.record("digits@1.0.0", x, rng.dirichlet(np.ones(CLASSES), 1), [1.0])
    assert len(closed) == 1
    direct = score_window(closed[0].counts, digits_reference())
    ingest_window(store, parse_window(window_to_proto(closed[0], "pi-1", 1).SerializeToString()), "pi-1", "mqtt")
    pooled = pool(store, "digits@1.0.0")
    assert direct is not None and direct.max_psi > 0.2
    assert pooled.score is not None and pooled.score.max_psi == pytest.approx(direct.max_psi)

    store.register_device("pi-roof", "lab", {"site": "roof"}, {}, "t")
    now = int(time.time() * 1000)
    recent = dataclasses.replace(window(digits_reference(), 30, 3), start_ms=now - 5000, end_ms=now)
    ingest_window(store, window_to_proto(recent, "pi-roof", 1), "pi-roof", "mqtt")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "telemetry",
            "--label",
            "site=roof",
            "--last",
            "60",
            "--data-dir",
            str(datadir.root),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    docs = json.loads(out.stdout)
    assert [(d["release"], d["devices"], d["inferences"]) for d in docs] == [("digits@1.0.0", 1, 30)]


def test_a_release_without_drift_reference_still_counts_its_windows() -> None:
    """Found by benchmarks/fleet_scale.py at 5,000 devices: a release published without a drift reference made
    every window flush fail (inputs reshaped to zero features), killing the agent's window timer."""
    closed: list[ClosedWindow] = []
    recorder = TelemetryRecorder(closed.append, every_inferences=40, every_seconds=3600)
    recorder.switch("plain@1", DriftReference.empty(CLASSES))
    rng = np.random.default_rng(3)
    for _ in range(30):  # the batched one-by-one path (its caller holds the lock, as the agent's serving does)
        with recorder.lock:
            recorder.record_one("plain@1", rng.random((1, FEATURES)), rng.dirichlet(np.ones(CLASSES), 1), 1.0)
    recorder.record("plain@1", rng.random((10, FEATURES)), rng.dirichlet(np.ones(CLASSES), 10), [1.0] * 10)
    assert len(closed) == 1
    assert closed[0].counts.inferences == 40 and closed[0].counts.class_counts.sum() == 40
    with pytest.raises(ValueError, match="input features"):
        recorder.switch("digits@1.0.0", digits_reference())
        recorder.record("digits@1.0.0", rng.random((2, 5)), rng.dirichlet(np.ones(CLASSES), 2), [1.0, 1.0])
