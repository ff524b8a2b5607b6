"""After a broker restart, how a fleet of real agents comes back: is it spread over the back-off window, or a
thundering herd? Issue 24 asks that no second holds more than a third of the fleet.

    .venv/bin/python benchmarks/reconnect_spread.py --devices 200 --workers 2 [--down-seconds 0]

The fleet: `--devices` real `edge_agent.agent.Agent`s (their own bundles, state, MQTT sessions), split over
`--workers` processes of one event loop each (simulations.fleet.SimulatedFleet), with the agent's shipped
`retry_seconds` unless told otherwise. No coordinator runs: registration keeps failing and retrying against a
port that refuses connections, which leaves the MQTT session, the thing measured, as it is in the field.

The measurement is the broker's own: Mosquitto logs every CONNECT it accepts ("New client connected ... as
fedfleet-agent-DEVICE") with the epoch second it happened in. Once every device says it is online (its status,
published after its subscriptions are acknowledged; agents caught mid-connect, their CONNECT logged but their
session not yet up, were seen to notice the loss only at aiomqtt's 10 s timeout: another experiment), the broker
is stopped (SIGTERM: it closes every session at once), kept down `--down-seconds`, and started again on the same
port; each device's first connect after that is its reconnect. Bins are the broker's whole seconds, from the
second it said "running" again. The reference in the same run is the issue's limit (a third of the fleet in any
one second): `ratio` = busiest second / limit, so <= 1 meets it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import AgentConfig
from edge_agent.contract import Topics
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from server.datadir import DataDir
from simulations.fleet import SimulatedFleet
from simulations.processes import Mosquitto, wait_for

FLEET = "spread"
CONNECTED = re.compile(rb"^(\d+): New client connected from \S+ as fedfleet-agent-(\S+) ", re.MULTILINE)
RUNNING = re.compile(rb"^(\d+): mosquitto version \S+ running", re.MULTILINE)
SHIPPED_RETRY_SECONDS = next(f.default for f in dataclasses.fields(AgentConfig) if f.name == "retry_seconds")


# ----- worker: one process of the fleet -----


async def _worker(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fleet = SimulatedFleet(
        DataDir(Path(args.data_dir)),
        Path(args.root),
        args.count,
        fleet=FLEET,
        grpc=args.grpc,
        mqtt=args.mqtt,
        first=args.first,
        workers=16,  # threads: aiomqtt connects in the default executor, so connects must not queue behind other work
        agent_extra={"retry_seconds": args.retry_seconds},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await fleet.start()
    await stop.wait()
    await fleet.stop()


def _spawn_workers(
    args: argparse.Namespace, d: DataDir, root: Path, grpc: str, mqtt: str
) -> list[subprocess.Popen[bytes]]:
    per = -(-args.devices // args.workers)
    procs = []
    for w in range(args.workers):
        first, count = w * per, min(per, args.devices - w * per)
        if count <= 0:
            break
        command = [sys.executable, __file__, "--worker", "--data-dir", str(d.root), "--root", str(root)]
        command += ["--first", str(first), "--count", str(count), "--grpc", grpc, "--mqtt", mqtt]
        command += ["--retry-seconds", str(args.retry_seconds)]
        with (root / f"worker-{w}.log").open("wb") as log:  # the worker keeps its own descriptor
            procs.append(subprocess.Popen(command, stdout=log, stderr=log))
    return procs


def _stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ----- the measurement -----


def connects_since(log: Path, offset: int) -> dict[str, int]:
    """Each device's first accepted CONNECT (broker epoch second) in the log from `offset` on."""
    first: dict[str, int] = {}
    for m in CONNECTED.finditer(log.read_bytes()[offset:]):
        first.setdefault(m.group(2).decode(), int(m.group(1)))
    return first


class OnlineWatch:
    """Devices whose latest status says online. An agent publishes it at the end of connecting, once its
    subscriptions are acknowledged: the agent's side of a session, where the broker's log shows only a CONNECT."""

    def __init__(self, port: int, prefix: str) -> None:
        self.online: set[str] = set()
        self._lock = threading.Lock()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"reconnect-spread-{uuid.uuid4().hex}")
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port)
        self._client.subscribe(Topics(prefix).status("+"), qos=1)
        self._client.loop_start()

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        status = pb.DeviceStatus.FromString(bytes(message.payload))
        with self._lock:
            (self.online.add if status.online else self.online.discard)(status.device_id)

    def count(self) -> int:
        with self._lock:
            return len(self.online)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def _histogram(seconds: list[int], start: int) -> list[tuple[int, int]]:
    """(seconds after `start`, connects in that second), every second from `start` to the last one."""
    counts = Counter(s - start for s in seconds)
    return [(s, counts.get(s, 0)) for s in range(0, max(counts) + 1)] if counts else []


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    d, created = DataDir.init(workdir / "data")
    assert created
    root = workdir / "fleet"
    root.mkdir()
    broker = Mosquitto(workdir / "broker")
    # gRPC goes to a port this process holds bound but never listens on: connections are refused at once, and
    # no other process (a coordinator someone else runs on this machine) can take it meanwhile.
    refuse = socket.socket()
    refuse.bind(("127.0.0.1", 0))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        t0 = time.monotonic()
        procs = _spawn_workers(args, d, root, f"127.0.0.1:{refuse.getsockname()[1]}", broker.url)

        devices: int = args.devices

        def workers_alive() -> None:
            for w, p in enumerate(procs):
                if p.poll() is not None:
                    log = (root / f"worker-{w}.log").read_text(errors="replace")
                    raise RuntimeError(f"fleet worker {w} exited ({p.returncode}):\n{log[-3000:]}")

        def all_online() -> bool:
            workers_alive()
            return watch.count() >= devices

        def all_connected(offset: int) -> bool:
            workers_alive()
            return len(connects_since(broker.log, offset)) >= devices

        watch = OnlineWatch(broker.port, d.config().topic_prefix)
        try:
            wait_for(all_online, 60 + devices * 0.5, 0.2, what=f"{devices} agents online")
        finally:
            watch.close()
        print(f"{devices} agents online in {time.monotonic() - t0:.1f} s; restarting the broker", flush=True)
        offset = broker.log.stat().st_size
        broker.stop()
        time.sleep(args.down_seconds)
        broker.start()
        t_restart = time.monotonic()
        wait_for(lambda: all_connected(offset), args.timeout, 0.2, what=f"{args.devices} agents reconnected")
        waited = time.monotonic() - t_restart
        tail = broker.log.read_bytes()[offset:]
        running = RUNNING.search(tail)
        assert running is not None, "the restarted broker's log has no 'running' line"
        restart = int(running.group(1))
        reconnects = connects_since(broker.log, offset)
    finally:
        _stop_workers(procs)
        broker.stop()
        refuse.close()

    seconds = sorted(reconnects.values())
    histogram = _histogram(seconds, restart)
    busiest = max(n for _, n in histogram)
    limit = args.devices / 3
    print(f"reconnects per broker second after the restart (retry_seconds {args.retry_seconds}):")
    for s, n in histogram:
        print(f"  +{s:>3} s {n:>5}  {'#' * round(60 * n / busiest)}")
    return {
        "benchmark": "reconnect_spread",
        "devices": args.devices,
        "workers": args.workers,
        "retry_seconds": args.retry_seconds,
        "down_seconds": args.down_seconds,
        "reconnected": len(reconnects),
        "busiest_second": busiest,
        "busiest_fraction": round(busiest / args.devices, 4),
        "limit": round(limit, 2),
        "ratio": round(busiest / limit, 4),
        "first_second": seconds[0] - restart,
        "last_second": seconds[-1] - restart,
        "spread_seconds": seconds[-1] - seconds[0],
        "all_back_seconds": round(waited, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=200, help="agents in the fleet (default 200)")
    parser.add_argument("--workers", type=int, default=2, help="processes the fleet is split over (default 2)")
    parser.add_argument(
        "--retry-seconds",
        type=float,
        default=SHIPPED_RETRY_SECONDS,
        help=f"the agents' retry_seconds (default: the shipped {SHIPPED_RETRY_SECONDS})",
    )
    parser.add_argument("--down-seconds", type=float, default=0.0, help="how long the broker stays down (default 0)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed for every agent to reconnect")
    parser.add_argument("--workdir", type=Path, help="where the temporary tree goes (default: the system's)")
    # A fleet worker process (started by this script itself).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--grpc", help=argparse.SUPPRESS)
    parser.add_argument("--mqtt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(_worker(args))
        return 0
    if args.devices <= 0 or args.workers <= 0 or args.retry_seconds <= 0 or args.down_seconds < 0:
        parser.error("--devices, --workers and --retry-seconds must be positive, --down-seconds not negative")
    with tempfile.TemporaryDirectory(prefix="reconnect-spread-", dir=args.workdir) as tmp:
        result = measure(args, Path(tmp))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
