"""The coordinator's CPU per device message of an update (its events and its status), next to a bare reader's.

    python benchmarks/update_messages.py --devices 1000

A sender in this process publishes, for each registered device, what an update brings the coordinator: one events
message (downloading carrying verified, installed and committed) and a retained status, both QoS 1 through
Mosquitto, `--burst` messages at a time every `--every` seconds (the default pace is a fan-out's: a few messages at
once, 200 a second). Two readers get the same messages: the coordinator (`fedfleet serve`: checks each message,
stores it, acknowledges it) and a bare one (a process with a plain paho subscriber that does nothing with them: the
floor of reading MQTT in Python). Each one's CPU over the send, until every event is stored, is divided by the
messages; the coordinator's idle CPU per second (its tick), measured before, is reported too, and taken off in
`coordinator_net_us_per_message`. The ratio to the bare reader is the figure to compare between commits: absolute
CPU times move with the machine.

Last line, JSON: {"benchmark": "update_messages", "devices", "messages", "coordinator_us_per_message",
"coordinator_net_us_per_message", "coordinator_idle_cpu_ms_per_second", "bare_us_per_message", "ratio"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt

from edge_agent.contract import Topics
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from server.datadir import DataDir
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers
from simulations.processes import CoordinatorProcess, MessageCounter, Mosquitto, cpu_seconds

KINDS = [pb.EVENT_KIND_DOWNLOADING, pb.EVENT_KIND_VERIFIED, pb.EVENT_KIND_INSTALLED, pb.EVENT_KIND_COMMITTED]


def _messages(topics: Topics, device: str) -> list[tuple[str, bytes, bool]]:
    events = [pb.UpdateEvent(device_id=device, kind=k, release_id="digits@1.0.0", counter=1) for k in KINDS]
    events[0].later.extend(events[1:])
    status = pb.DeviceStatus(device_id=device, online=True, running_release="digits@1.0.0", running_counter=1)
    return [
        (topics.events(device), events[0].SerializeToString(), False),
        (topics.status(device), status.SerializeToString(), True),
    ]


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="update-messages-") as tmp:
        root = Path(tmp)
        broker = Mosquitto(root / "broker")
        coordinator = bare = None
        try:
            d, _ = DataDir.init(root / "data")
            store = d.store()
            devices = [f"upd-{i:05d}" for i in range(args.devices)]
            for device in devices:
                store.register_device(device, "bench", {}, {}, "bench")
            model = build_dense_model(random_dense_layers([64, 16, 10], 1))
            publish_release(d.repository(), store, model, "digits", "1.0.0")
            coordinator = CoordinatorProcess(d, broker.url).start()
            topics = Topics(d.config().topic_prefix)
            bare = MessageCounter(broker.port, [topics.status("+"), topics.events("+")], 1, "bare")
            await bare.ready()
            assert coordinator.proc is not None
            pids = (coordinator.proc.pid, bare.proc.pid)
            await asyncio.sleep(1.0)  # the coordinator's start-up work done
            idle0, t0 = cpu_seconds(pids[0]), time.monotonic()
            await asyncio.sleep(args.idle_seconds)
            idle_per_second = (cpu_seconds(pids[0]) - idle0) / (time.monotonic() - t0)

            queue = [message for dev in devices for message in _messages(topics, dev)]
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier="update-sender") as sender:
                sender.pending_calls_threshold = len(queue) + 1
                cpu0, start = [cpu_seconds(p) for p in pids], time.monotonic()
                for i in range(0, len(queue), args.burst):
                    burst = queue[i : i + args.burst]
                    await asyncio.gather(*(sender.publish(t, p, qos=1, retain=r) for t, p, r in burst))
                    await asyncio.sleep(args.every)
                deadline = time.monotonic() + args.timeout
                while store.count_events() < len(KINDS) * len(devices):
                    if time.monotonic() > deadline:
                        raise TimeoutError("the coordinator did not store every event in time")
                    await asyncio.sleep(0.05)
                while await bare.count() < len(queue) and time.monotonic() < deadline:  # the bare reader too
                    await asyncio.sleep(0.05)
                elapsed = time.monotonic() - start
                cpu = [cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True)]
            store.close()
        finally:
            if bare is not None:
                bare.stop()
            if coordinator is not None:
                coordinator.kill()
            broker.stop()
    n = len(queue)
    return {
        "benchmark": "update_messages",
        "devices": args.devices,
        "messages": n,
        "seconds": round(elapsed, 2),
        "coordinator_us_per_message": round(cpu[0] / n * 1e6, 1),
        "coordinator_net_us_per_message": round((cpu[0] - idle_per_second * elapsed) / n * 1e6, 1),
        "coordinator_idle_cpu_ms_per_second": round(idle_per_second * 1000, 1),
        "bare_us_per_message": round(cpu[1] / n * 1e6, 1),
        "ratio": round(cpu[0] / cpu[1], 2) if cpu[1] > 0 else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000, help="registered devices, one update's messages each")
    parser.add_argument("--burst", type=int, default=10, help="messages published at once")
    parser.add_argument("--every", type=float, default=0.05, help="seconds between bursts")
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="how long the idle CPU is measured first")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the last event stored")
    args = parser.parse_args()
    if args.devices < 1 or args.burst < 1 or args.every < 0 or args.idle_seconds <= 0:
        parser.error("--devices, --burst and --idle-seconds must be positive, --every not negative")
    print(json.dumps(asyncio.run(main_async(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
