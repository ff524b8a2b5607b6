"""One worker process of a large simulated fleet: devices FIRST .. FIRST+COUNT-1 as real agents on one event
loop, inferring at RATE per second, until SIGTERM. Fleets of thousands run as several of these, so that both
cores work and no process holds every device (simulations/fleet_scale.py starts them).

    python -m simulations.fleet_worker --data-dir D --root R --fleet F --first 0 --count 1000 \
        --grpc 127.0.0.1:50051 --mqtt mqtt://127.0.0.1:1883 [--rate 1] [--telemetry-seconds 5] \
        [--agent-extra '{"mirrors": ["https://127.0.0.1:8443"]}']

Every device of a worker is an agent of the same process, so `--agent-extra '{"share_models": true}'` lets those
that committed the same verified bytes share one interpreter (with `"xnnpack": false`, one without XNNPACK's
repacked weights): benchmarks/fleet_scale.py does, to measure what a device costs the simulation rather than
thousands of copies of one model. Without it each device loads its own model, as a real device does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from server.datadir import DataDir
from simulations.fleet import SimulatedFleet
from simulations.workload import Workload


async def _run(args: argparse.Namespace) -> None:
    fleet = SimulatedFleet(
        DataDir(Path(args.data_dir)),
        Path(args.root),
        args.count,
        fleet=args.fleet,
        grpc=args.grpc,
        mqtt=args.mqtt,
        first=args.first,
        agent_extra={
            "telemetry_every_seconds": args.telemetry_seconds,
            "telemetry_every_inferences": 10_000,
            **json.loads(args.agent_extra),
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await fleet.start()
    workload = asyncio.create_task(Workload(fleet.agents, args.rate, args.first).run())
    await stop.wait()
    workload.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await workload
    await fleet.stop()


def spawn_workers(
    d: DataDir,
    root: Path,
    fleet: str,
    devices: int,
    workers: int,
    grpc: str,
    mqtt: str,
    rate: float = 1.0,
    telemetry_seconds: float = 5.0,
    agent_extra: Mapping[str, Any] | None = None,
) -> list[subprocess.Popen[bytes]]:
    """Start `workers` worker processes that together run `devices` devices of `fleet` (logs under root); each
    device closes a telemetry window every `telemetry_seconds`. `agent_extra` (JSON-serialisable) goes into
    every device's agent.toml, e.g. `mirrors` and `mirror_ca`."""
    per = -(-devices // workers)
    procs = []
    for w in range(workers):
        count = min(per, devices - w * per)
        args = ["--data-dir", str(d.root), "--root", str(root / fleet), "--fleet", fleet, "--first", str(w * per)]
        args += ["--count", str(count), "--grpc", grpc, "--mqtt", mqtt, "--rate", str(rate)]
        args += ["--telemetry-seconds", str(telemetry_seconds), "--agent-extra", json.dumps(dict(agent_extra or {}))]
        with (root / f"{fleet}-worker-{w}.log").open("wb") as log:  # the worker keeps its own descriptor
            procs.append(
                subprocess.Popen([sys.executable, "-m", "simulations.fleet_worker", *args], stdout=log, stderr=log)
            )
    return procs


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="The coordinator's data directory (for enrollment).")
    parser.add_argument("--root", required=True, help="Where the devices' state directories live.")
    parser.add_argument("--fleet", required=True, help="Fleet name.")
    parser.add_argument("--first", type=int, default=0, help="Number of this worker's first device.")
    parser.add_argument("--count", type=int, required=True, help="Devices in this worker.")
    parser.add_argument("--grpc", required=True, help="Coordinator gRPC address host:port.")
    parser.add_argument("--mqtt", required=True, help="Broker URL mqtt://host:port.")
    parser.add_argument("--rate", type=float, default=1.0, help="Inferences per device per second.")
    parser.add_argument("--telemetry-seconds", type=float, default=5.0, help="A telemetry window every this often.")
    parser.add_argument("--agent-extra", default="{}", help="More agent.toml settings for every device, as JSON.")
    asyncio.run(_run(parser.parse_args()))


if __name__ == "__main__":
    main()
