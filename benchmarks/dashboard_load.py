"""The dashboard and its API under load: with a fleet of real agents (worker processes) reporting telemetry to a
coordinator (`fedfleet serve`) over Mosquitto, p50/p95 latency of the endpoints behind the main pages and the
live-update delay (a change in the store → the server-sent event that reports it), first with the rollout
idle (paused), then with the same rollout running (waves assigning, devices installing, gates pooling
telemetry every tick), in the same run. The ratio is running over idle.

    .venv/bin/python benchmarks/dashboard_load.py [--devices 1000] [--workers 2] [--requests 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from server import audit
from server.datadir import DataDir
from server.store.rollouts import RolloutRecords
from simulations.fleet_worker import spawn_workers, stop_workers
from simulations.processes import CoordinatorProcess, Mosquitto, wait_for
from simulations.rig import RELEASES, Rig


def _quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50_ms": round(statistics.median(ordered) * 1000, 2), "p95_ms": round(p95 * 1000, 2)}


def _count(d: DataDir, fleet: str, online: bool | None = None, running_release: str | None = None) -> int:
    with d.store() as store:
        return store.count_devices(fleet=fleet, online=online, running_release=running_release)


def _rollout(d: DataDir, rollout_id: str) -> dict[str, Any]:
    with d.store() as store:
        row = RolloutRecords(store).get(rollout_id)
    assert row is not None, f"no rollout {rollout_id}"
    return row


async def _latencies(http: httpx.AsyncClient, paths: list[str], requests: int) -> dict[str, dict[str, float]]:
    """Each path `requests` times, in turns (so drift in the machine's load spreads over all of them)."""
    samples: dict[str, list[float]] = {p: [] for p in paths}
    for _ in range(requests):
        for p in paths:
            t = time.perf_counter()
            r = await http.get(p)
            samples[p].append(time.perf_counter() - t)
            r.raise_for_status()
    return {p: _quantiles(s) for p, s in samples.items()}


async def _live_delays(http: httpx.AsyncClient, d: DataDir, count: int) -> dict[str, float]:
    """Append an audit entry (as any change would be stored) and time the event that reports it."""
    delays: list[float] = []
    async with http.stream("GET", "/api/stream") as stream:
        lines = stream.aiter_lines()
        assert await anext(lines) == "event: hello"
        await asyncio.sleep(1.0)
        store = d.store()
        try:
            for i in range(count):
                audit.append(store, "benchmark.mark", f"mark-{i}", {}, actor="benchmark")
                t = time.perf_counter()
                async for line in lines:
                    if line.startswith("data:") and "audit" in json.loads(line[5:]).get("changed", []):
                        delays.append(time.perf_counter() - t)
                        break
                await asyncio.sleep(0.3)
        finally:
            store.close()
    return _quantiles(delays)


async def _measure(url: str, token: str, d: DataDir, paths: list[str], requests: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        # A page is open and listening while the others are requested, as in a real operator's browser.
        async with (
            httpx.AsyncClient(base_url=url, headers=headers, timeout=None) as listener,
            listener.stream("GET", "/api/stream"),
        ):
            pages = await _latencies(http, paths, requests)
        live = await _live_delays(http, d, max(5, requests // 2))
    return {"pages": pages, "live_update": live}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=20, help="requests per endpoint and phase")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedfleet-dashboard-") as tmp:
        root = Path(tmp)
        broker = Mosquitto(root / "mosquitto")
        rig = Rig(root)  # for its releases and its `fedfleet … --json` runner over root/data
        d, _ = DataDir.init(rig.datadir.root)
        base = rig.publish(d)
        coordinator = CoordinatorProcess(d, broker.url).start()
        fleet = f"dash{uuid.uuid4().hex[:6]}"
        grpc = coordinator.endpoints["grpc"]
        procs = spawn_workers(d, root, fleet, args.devices, args.workers, grpc, broker.url, rate=2.0)
        try:
            n = args.devices
            wait_for(lambda: _count(d, fleet, online=True) == n, 120 + n * 0.2, 1.0, what=f"{n} devices online")
            cli = rig.cli
            cli("assign", "--fleet", fleet, base)
            wait_for(lambda: _count(d, fleet, running_release=base) == n, 120 + n * 0.2, 1.0, what="fleet on the base")
            waves = ["--canary", str(max(1, n // 20)), "--waves", "0.25,0.5,0.75,1.0", "--bake", "15"]
            rollout = cli("rollout", "start", RELEASES["healthy"], "--fleet", fleet, *waves, "--min-samples", "300")
            rollout_id = rollout["id"]
            cli("rollout", "pause", rollout_id)
            time.sleep(6)  # a telemetry period: every device has reported at least once
            url, token = coordinator.endpoints["dashboard"], d.operator_token()
            device = f"{fleet}-00000"
            paths = [
                "/",
                "/api/fleet",
                "/api/rollouts",
                f"/api/rollouts/{rollout_id}",
                f"/api/devices/{device}",
                "/api/drift?minutes=5",
                "/api/audit",
                "/metrics",
            ]
            idle = asyncio.run(_measure(url, token, d, paths, args.requests))
            print(f"idle: {json.dumps(idle)}", flush=True)
            cli("rollout", "resume", rollout_id)
            try:
                wait_for(
                    lambda: _rollout(d, rollout_id)["wave"] >= 1,
                    300,
                    0.5,
                    what="the rollout past its canary",
                )
            except AssertionError:
                print(json.dumps(rig.status(rollout_id), indent=1)[:4000], file=sys.stderr)
                raise
            running = asyncio.run(_measure(url, token, d, paths, args.requests))
            now = _rollout(d, rollout_id)
            phase, wave = now["phase"], now["wave"]
            print(f"running (rollout now {phase}, wave {wave}): {json.dumps(running)}", flush=True)
        finally:
            stop_workers(procs)
            coordinator.kill()
            broker.stop()
    ratios = {p: round(running["pages"][p]["p95_ms"] / idle["pages"][p]["p95_ms"], 3) for p in paths}
    live_ratio = round(running["live_update"]["p95_ms"] / idle["live_update"]["p95_ms"], 3)
    for p in paths:
        i, r = idle["pages"][p], running["pages"][p]
        print(
            f"{p:36} idle p50 {i['p50_ms']:8.1f} p95 {i['p95_ms']:8.1f} ms | running p50 {r['p50_ms']:8.1f} "
            f"p95 {r['p95_ms']:8.1f} ms | p95 x{ratios[p]:.2f}"
        )
    live_i, live_r = idle["live_update"], running["live_update"]
    print(
        f"live update delay: idle p50 {live_i['p50_ms']} p95 {live_i['p95_ms']} ms, running p50 {live_r['p50_ms']} "
        f"p95 {live_r['p95_ms']} ms (p95 x{live_ratio:.2f})"
    )
    result = {
        "benchmark": "dashboard_load",
        "devices": args.devices,
        "rollout_phase_after": phase,
        "idle": idle,
        "running": running,
        "p95_ratio": ratios,
        "p95_ratio_max": max(ratios.values()),
        "live_update_p95_ratio": live_ratio,
    }
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
