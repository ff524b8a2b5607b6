"""Telemetry ingest: N simulated agents send windows as fast as QoS 1 allows for a bounded time; windows stored
per second end to end, next to a bare pipeline measured in the same run.

    python benchmarks/ingest.py --devices 1000 --seconds 10

Senders (this process, one event loop): N MQTT clients, each publishing real TelemetryWindow payloads with
its own increasing sequence numbers (QoS 1) until the time is up. fedfleet: the coordinator process (`fedfleet
serve` on the same Mosquitto) checks, stores once and acknowledges each window. Bare: a plain subscriber
process inserting the same payloads into SQLite in batches. Each rate is windows sent / time until the last
one is stored; loss is checked (every sequence stored exactly once). Target: fedfleet >= 0.75 of bare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt
import numpy as np

from edge_agent.contract import Topics
from edge_agent.contract.drift import DriftReference, WindowCounts
from edge_agent.contract.windows import ClosedWindow, window_to_proto
from server.datadir import DataDir
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers
from simulations.processes import CoordinatorProcess, Mosquitto

FEATURES, CLASSES = 64, 10

BARE = r"""
import asyncio, sqlite3, sys, time, aiomqtt
port, db_path, prefix = int(sys.argv[1]), sys.argv[2], sys.argv[3]
db = sqlite3.connect(db_path, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL"); db.execute("PRAGMA synchronous=NORMAL")
db.execute("CREATE TABLE IF NOT EXISTS w (topic TEXT, payload BLOB)")
async def main():
    batch = []
    def flush():
        if batch:
            db.execute("BEGIN"); db.executemany("INSERT INTO w VALUES (?, ?)", batch); db.execute("COMMIT")
            batch.clear()
    async def timer():
        while True:
            await asyncio.sleep(0.2)
            flush()
    async with aiomqtt.Client("127.0.0.1", port, identifier="bare-ingest", max_queued_incoming_messages=0) as c:
        await c.subscribe(f"{prefix}/devices/+/telemetry", qos=1)
        asyncio.create_task(timer())
        print("ready", flush=True)
        async for m in c.messages:
            batch.append((m.topic.value, bytes(m.payload)))
            if len(batch) >= 500:
                flush()
asyncio.run(main())
"""


def _reference() -> DriftReference:
    return DriftReference.from_samples(np.random.default_rng(0).random((2000, FEATURES)), CLASSES)


def _template(ref: DriftReference) -> ClosedWindow:
    rng = np.random.default_rng(1)
    counts = WindowCounts.empty(ref)
    p = rng.dirichlet(np.ones(CLASSES), 50)
    counts.add(ref, rng.random((50, FEATURES)), p, rng.exponential(1.0, 50))
    return ClosedWindow("digits@1.0.0", 1, 2, counts)


async def _send(
    port: int, devices: list[str], seconds: float, template: ClosedWindow, topics: Topics
) -> dict[str, int]:
    sent = dict.fromkeys(devices, 0)
    deadline = time.monotonic() + seconds

    async def sender(device: str) -> None:
        async with aiomqtt.Client("127.0.0.1", port, identifier=f"sender-{device}", timeout=60) as client:
            base = window_to_proto(template, device, 1)
            while time.monotonic() < deadline:
                seq = sent[device] + 1
                base.sequence = base.first_sequence = seq
                await client.publish(topics.telemetry(device), base.SerializeToString(), qos=1)
                sent[device] = seq

    await asyncio.gather(*(sender(d) for d in devices))
    return sent


async def _wait_stored(count: callable, total: int, timeout: float) -> float:  # type: ignore[valid-type]
    deadline = time.monotonic() + timeout
    while (n := count()) < total:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {n}/{total} windows stored")
        await asyncio.sleep(0.05)
    return time.monotonic()


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="ingest-") as tmp:
        root = Path(tmp)
        broker = Mosquitto(root / "broker")
        try:
            d, _ = DataDir.init(root / "data")
            store = d.store()
            ref = _reference()
            model = build_dense_model(random_dense_layers([FEATURES, 16, CLASSES], 1))
            publish_release(
                d.repository(), store, model, "digits", "1.0.0", extra={"drift_reference": ref.to_metadata()}
            )
            devices = [f"ing-{i:05d}" for i in range(args.devices)]
            for dev in devices:
                store.register_device(dev, "bench", {}, {}, "bench")
            template = _template(ref)

            coordinator = CoordinatorProcess(d, broker.url).start()
            try:
                start = time.monotonic()
                sent = await _send(broker.port, devices, args.seconds, template, Topics())
                total = sum(sent.values())
                end = await _wait_stored(
                    lambda: store.db.execute("SELECT count(*) FROM telemetry").fetchone()[0], total, args.timeout
                )
                fedfleet_rate = total / (end - start)
                lost = store.db.execute(
                    "SELECT count(*) FROM telemetry_watermarks WHERE watermark != "
                    "(SELECT max(sequence) FROM telemetry t WHERE t.device_id = telemetry_watermarks.device_id)"
                ).fetchone()[0]
                per_device_ok = all(
                    store.db.execute(
                        "SELECT count(*), max(sequence) FROM telemetry WHERE device_id = ?", [dev]
                    ).fetchone()
                    == (n, n or None)
                    for dev, n in sent.items()
                    if n
                )
            finally:
                coordinator.kill()
            print(f"fedfleet: {total} windows from {args.devices} devices stored at {fedfleet_rate:.0f}/s", flush=True)

            bare_db = root / "bare.db"
            bare = subprocess.Popen(
                [sys.executable, "-c", BARE, str(broker.port), str(bare_db), "bench/v1"],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert bare.stdout is not None and bare.stdout.readline().strip() == "ready"
                start = time.monotonic()
                sent_bare = await _send(broker.port, devices, args.seconds, template, Topics("bench/v1"))
                total_bare = sum(sent_bare.values())
                conn = sqlite3.connect(bare_db)
                end = await _wait_stored(
                    lambda: conn.execute("SELECT count(*) FROM w").fetchone()[0], total_bare, args.timeout
                )
                conn.close()
                bare_rate = total_bare / (end - start)
            finally:
                bare.kill()
                bare.wait()
            print(f"bare:     {total_bare} windows stored at {bare_rate:.0f}/s", flush=True)
            store.close()
        finally:
            broker.stop()
    return {
        "benchmark": "ingest",
        "devices": args.devices,
        "seconds": args.seconds,
        "windows": total,
        "windows_per_second": round(fedfleet_rate, 1),
        "bare_windows": total_bare,
        "bare_windows_per_second": round(bare_rate, 1),
        "ratio": round(fedfleet_rate / bare_rate, 3),
        "lost": int(lost) + (0 if per_device_ok else 1),
        "target_ratio": 0.75,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000, help="simulated agents (default 1000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long they send (default 10)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for the backlog to drain")
    args = parser.parse_args()
    if args.devices < 1 or args.seconds <= 0:
        parser.error("--devices and --seconds must be positive")
    print(json.dumps(asyncio.run(main_async(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
