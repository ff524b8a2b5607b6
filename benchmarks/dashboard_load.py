"""The dashboard and its API under load: with a fleet of real agents (worker processes) reporting telemetry to a
coordinator (`fedfleet serve`) over Mosquitto, p50/p95 latency of the endpoints behind the main pages and the
live-update delay (a change in the store → the server-sent event that reports it), first with the rollout
idle (paused), then with the same rollout running (waves assigning, devices installing, gates pooling
telemetry every tick), in the same run. The ratio is running over idle.

With --prune, retention while the dashboard is used: the store also holds a day of telemetry windows, received
two to three days ago, from as many devices again (a fleet of their own, silent since; `--day-windows` per device,
one a minute by default: the agent's default period) on a release no live rollout protects. The policy keeps
telemetry a day and sets serve's retention interval to `--prune-after`, so serve's own housekeeper begins pruning
that many seconds after serve starts: after the idle phase (measured with the day stored, nothing pruning), the
same pages are measured again while it prunes, and once more when the prune is done ("settled"), before the rollout
resumes. A live device's page shows its newest 100 windows and scores each, so it costs more as the device's
history grows: with --prune the idle phase waits until the measured device has sent that many windows (100 telemetry
periods; `--telemetry-seconds` sets the period), so all three phases show the same amount. `prune_p95_ratio` is the
largest pruning p95 over the pages, each against the mean of its idle and settled p95 (the phases on either side,
nothing pruning: what drifts with time cancels); `rows_pruned` is what the prune's audit entry counts. The running
phase then sees a store without the old day. Every run ends by verifying the audit chain (`audit_verified`).

    .venv/bin/python benchmarks/dashboard_load.py [--devices 1000] [--workers 2] [--requests 20] [--rate 2]
        [--telemetry-seconds 5] [--prune [--day-windows 1440] [--prune-after SECONDS] [--prune-batch-rows N]]
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from server import audit
from server.dashboard.views import DEVICE_PAGE_WINDOWS
from server.datadir import DataDir
from server.loop.retention import DAY_MS
from server.policy import Retention
from server.store import Store, now_ms
from server.store.rollouts import RolloutRecords
from server.store.telemetry import TelemetryRecords
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


@dataclass(frozen=True)
class PastDay:
    """A day of telemetry windows in the store, `windows` per device, received two to three days ago."""

    devices: list[str]
    windows: int

    @property
    def total(self) -> int:
        return len(self.devices) * self.windows

    def pruning_began(self, store: Store) -> bool:
        """Whether the oldest window is gone (a prune walks the table oldest row first)."""
        return not TelemetryRecords(store).overlapping(self.devices[0], 1, 1)

    def left(self, store: Store) -> int:
        records = TelemetryRecords(store)
        return sum(len(records.overlapping(device, 1, self.windows)) for device in self.devices)


def _store_a_past_day(d: DataDir, fleet: str, devices: int, windows: int, release: str, template: bytes) -> PastDay:
    """Register `devices` devices of `fleet` (never connected) and store, as ingestion would, `windows` windows of
    each spread over the day that ended two days ago, each received as it closed. Every payload is `template` (a
    live device's window as stored) with the device, sequence, release and times of its own."""
    period = DAY_MS // windows
    day_start = now_ms() - 3 * DAY_MS
    window = pb.TelemetryWindow.FromString(template)
    ids = [f"{fleet}-{i:05d}" for i in range(devices)]
    with d.store() as store:
        records = TelemetryRecords(store)
        for device in ids:
            store.register_device(device, fleet, {}, {}, "benchmark")
            with store.transaction():  # a device's day at a time: ingestion and the loop wait for one short lock
                for sequence in range(1, windows + 1):
                    end = day_start + sequence * period
                    window.device_id, window.release_id = device, release
                    window.sequence = window.first_sequence = sequence
                    window.start_ms, window.end_ms = end - period, end
                    records.insert(window, end, "mqtt")
                records.set_watermark(device, windows)
    return PastDay(ids, windows)


def _windows_sent(d: DataDir, device: str) -> int:
    """How many windows `device` has sent so far (its page shows the newest 100)."""
    with d.store() as store:
        return TelemetryRecords(store).watermark(device)


def _template_window(d: DataDir, device: str, release: str) -> bytes | None:
    """A window `device` sent on `release`, as stored (None: none yet)."""
    with d.store() as store:
        return next((payload for _, payload in TelemetryRecords(store).payloads(release, [device])), None)


def _prune_entry(store: Store) -> dict[str, Any] | None:
    newest = audit.entries(store, 1, action="retention.prune")
    return newest[0] if newest else None


def _measure_while_pruning(
    d: DataDir, past: PastDay, prune_at: float, url: str, token: str, paths: list[str], requests: int, batch_rows: int
) -> dict[str, Any]:
    """Wait (until `prune_at` on the monotonic clock, and a minute more) for serve's housekeeper to begin pruning
    the past day, measure the pages while it goes on, then wait for the prune's audit entry."""
    with d.store() as store:  # one connection for the polls (opening one takes the write lock for a moment)
        wait_for(
            lambda: past.pruning_began(store),
            max(1.0, prune_at + 60 - time.monotonic()),
            0.1,
            what="serve's housekeeper to begin its prune",
        )
        began = time.time()
        measured = asyncio.run(_measure(url, token, d, paths, requests))
        # At most a second per batch, with a generous floor.
        bound = 120 + past.total / batch_rows
        entry = wait_for(lambda: _prune_entry(store), bound, 0.5, what="the prune's audit entry")
        left = past.left(store)
    ended = entry["at"] / 1000
    return {
        **measured,
        "rows_pruned": entry["detail"]["deleted"],
        "batches": entry["detail"]["batches"],
        "prune_seconds": round(ended - began, 2),  # from the first batch seen gone (polled every 0.1 s)
        "pages_overlap": round(min(1.0, max(0.0, (ended - began) / measured["pages_seconds"])), 3),
        "windows_left": left,
    }


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
            started = time.perf_counter()
            pages = await _latencies(http, paths, requests)
            pages_seconds = time.perf_counter() - started
        live = await _live_delays(http, d, max(5, requests // 2))
    return {"pages": pages, "live_update": live, "pages_seconds": round(pages_seconds, 2)}


def _default_prune_after(devices: int, day_windows: int, telemetry_seconds: float) -> float:
    """Time enough, from serve's start, for the fleet to come online and take the base, the past day to be stored,
    the measured device's page to fill and the idle phase to be measured (on this 2-core machine; --prune-after
    overrides it)."""
    fill = DEVICE_PAGE_WINDOWS * telemetry_seconds
    return float(round(90 + 0.6 * devices + devices * day_windows / 10_000 + fill))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=20, help="requests per endpoint and phase")
    parser.add_argument("--rate", type=float, default=2.0, help="inferences per device per second")
    parser.add_argument("--telemetry-seconds", type=float, default=5.0, help="a telemetry window every this often")
    parser.add_argument("--prune", action="store_true", help="measure the pages again while serve prunes a past day")
    parser.add_argument("--day-windows", type=int, default=24 * 60, help="with --prune: windows per device in the day")
    parser.add_argument(
        "--prune-after",
        type=float,
        help="with --prune: seconds from serve's start to its first prune (default: 90 + 0.6 a device + 0.1 per "
        "1000 past windows + 100 telemetry periods)",
    )
    parser.add_argument(
        "--prune-batch-rows",
        type=int,
        help="with --prune: the policy's retention.batch_rows (default: the policy's, 500); a small day needs small "
        "batches for the prune to last while the pages are measured",
    )
    args = parser.parse_args()
    if args.prune_batch_rows is not None and not 1 <= args.prune_batch_rows <= 10_000:
        parser.error("--prune-batch-rows must be a whole number from 1 to 10000")
    if min(args.devices, args.workers, args.requests, args.day_windows) < 1 or not args.rate > 0:
        parser.error("--devices, --workers, --requests, --day-windows and --rate must be positive")
    if not args.telemetry_seconds >= 0.1:
        parser.error("--telemetry-seconds must be at least 0.1")
    prune_after = args.prune_after
    if prune_after is None:
        prune_after = _default_prune_after(args.devices, args.day_windows, args.telemetry_seconds)
    if not prune_after >= 1:
        parser.error("--prune-after must be at least 1 (serve's shortest retention interval)")
    past: PastDay | None = None
    pruning: dict[str, Any] | None = None
    settled: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="fedfleet-dashboard-") as tmp:
        root = Path(tmp)
        broker = Mosquitto(root / "mosquitto")
        rig = Rig(root)  # for its releases and its `fedfleet … --json` runner over root/data
        d, _ = DataDir.init(rig.datadir.root)
        if args.prune:  # telemetry kept a day; serve's first prune `prune_after` seconds after it starts
            policy = f"[retention]\ntelemetry_days = 1\ninterval_seconds = {prune_after}\n"
            if args.prune_batch_rows is not None:
                policy += f"batch_rows = {args.prune_batch_rows}\n"
            (d.root / d.config().policy).write_text(policy)
        base = rig.publish(d)
        coordinator = CoordinatorProcess(d, broker.url).start()
        prune_at = time.monotonic() + prune_after
        fleet = f"dash{uuid.uuid4().hex[:6]}"
        grpc = coordinator.endpoints["grpc"]
        procs = spawn_workers(
            d, root, fleet, args.devices, args.workers, grpc, broker.url, args.rate, args.telemetry_seconds
        )
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
            time.sleep(args.telemetry_seconds + 1)  # a telemetry period: every device has reported at least once
            url, token = coordinator.endpoints["dashboard"], d.operator_token()
            device = f"{fleet}-00000"
            if args.prune:
                template = wait_for(lambda: _template_window(d, device, base), 60, 0.5, what=f"a window of {device}")
                started = time.perf_counter()
                # On the rig's third release: no live rollout protects it (the paused one is base -> healthy).
                past = _store_a_past_day(d, f"{fleet}past", n, args.day_windows, RELEASES["scrambled"], template)
                print(f"stored {past.total} past windows in {time.perf_counter() - started:.1f} s", flush=True)
                full = DEVICE_PAGE_WINDOWS * args.telemetry_seconds
                print(
                    f"waiting until {device}'s page is full ({DEVICE_PAGE_WINDOWS} windows, ~{full:.0f} s)", flush=True
                )
                wait_for(
                    lambda: _windows_sent(d, device) >= DEVICE_PAGE_WINDOWS,
                    60 + 2 * full,
                    0.5,
                    what=f"{DEVICE_PAGE_WINDOWS} windows from {device}",
                )
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
            idle = asyncio.run(_measure(url, token, d, paths, args.requests)) | {
                "device_windows": _windows_sent(d, device)
            }
            print(f"idle: {json.dumps(idle)}", flush=True)
            if past is not None:
                with d.store() as store:
                    began = past.pruning_began(store)
                if began:  # the idle phase is no longer the figure without pruning
                    raise SystemExit(f"serve began pruning during the idle phase: raise --prune-after ({prune_after})")
                batch_rows = args.prune_batch_rows or Retention().batch_rows
                pruning = _measure_while_pruning(d, past, prune_at, url, token, paths, args.requests, batch_rows)
                pruning["device_windows"] = _windows_sent(d, device)
                print(f"pruning: {json.dumps(pruning)}", flush=True)
                settled = asyncio.run(_measure(url, token, d, paths, args.requests))
                settled["device_windows"] = _windows_sent(d, device)
                print(f"settled: {json.dumps(settled)}", flush=True)
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
        with d.store() as store:
            checked, problems = audit.verify(store)
    ratios, live_ratio = _compare(idle, running, paths, "running")
    result: dict[str, Any] = {
        "benchmark": "dashboard_load",
        "devices": args.devices,
        "rollout_phase_after": phase,
        "idle": idle,
        "running": running,
        "p95_ratio": ratios,
        "p95_ratio_max": max(ratios.values()),
        "live_update_p95_ratio": live_ratio,
        "audit_verified": not problems,
        "audit_entries_checked": checked,
    }
    if past is not None and pruning is not None and settled is not None:
        result |= _prune_figures(past, pruning, _bracket(idle, settled, paths), paths, prune_after)
    sys.stdout.write(json.dumps(result) + "\n")
    if problems:
        sys.exit(f"the audit chain does not verify: {'; '.join(f'{p.seq}: {p.problem}' for p in problems[:5])}")


def _compare(
    idle: dict[str, Any], phase: dict[str, Any], paths: list[str], name: str, base: str = "idle"
) -> tuple[dict[str, float], float]:
    """Each page's p95 in a phase over its p95 in the `base` phase, and the live-update delay's, printed per page."""
    ratios = {p: round(phase["pages"][p]["p95_ms"] / idle["pages"][p]["p95_ms"], 3) for p in paths}
    live_ratio = round(phase["live_update"]["p95_ms"] / idle["live_update"]["p95_ms"], 3)
    for p in paths:
        i, r = idle["pages"][p], phase["pages"][p]
        print(
            f"{p:36} {base} p50 {i['p50_ms']:8.1f} p95 {i['p95_ms']:8.1f} ms | {name} p50 {r['p50_ms']:8.1f} "
            f"p95 {r['p95_ms']:8.1f} ms | p95 x{ratios[p]:.2f}"
        )
    live_i, live_r = idle["live_update"], phase["live_update"]
    print(
        f"live update delay: {base} p50 {live_i['p50_ms']} p95 {live_i['p95_ms']} ms, {name} p50 {live_r['p50_ms']} "
        f"p95 {live_r['p95_ms']} ms (p95 x{live_ratio:.2f})"
    )
    return ratios, live_ratio


def _bracket(idle: dict[str, Any], settled: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """The phases before and after the prune (nothing pruning), as one phase: each quantile the mean of theirs."""

    def mean(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {k: round((a[k] + b[k]) / 2, 2) for k in a}

    return {
        "idle": idle,
        "settled": settled,
        "pages": {p: mean(idle["pages"][p], settled["pages"][p]) for p in paths},
        "live_update": mean(idle["live_update"], settled["live_update"]),
    }


def _prune_figures(
    past: PastDay, pruning: dict[str, Any], bracket: dict[str, Any], paths: list[str], prune_after: float
) -> dict[str, Any]:
    """The pruning phase against the bracket of phases around it (the same pages, nothing pruning), printed too."""
    ratios, live_ratio = _compare(bracket, pruning, paths, "pruning", "around")
    print(
        f"pruned {pruning['rows_pruned']} in {pruning['batches']} batches over about {pruning['prune_seconds']} s, "
        f"pruning during {pruning['pages_overlap']:.0%} of the pages' measurement; "
        f"{pruning['windows_left']} of the past day's {past.total} windows left"
    )
    return {
        "pruning": pruning,
        "settled": bracket["settled"],
        "prune_p95_ratio": max(ratios.values()),
        "prune_p95_ratios": ratios,
        "live_update_prune_p95_ratio": live_ratio,
        "rows_pruned": sum(pruning["rows_pruned"].values()),
        "past_windows": past.total,
        "day_windows": past.windows,
        "prune_after_seconds": prune_after,
    }


if __name__ == "__main__":
    main()
