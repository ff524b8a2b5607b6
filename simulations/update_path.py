"""The update path end to end on this machine: a coordinator (embedded broker), a fleet of real agents in one
process, two signed releases, an upgrade and a fleet rollback. Prints progress and a summary.

    python -m simulations.update_path [--devices 20] [--out demo-out]

The models are small untrained dense networks built from seeded weights: federated training arrives with its
own command (`fedfleet train`), and the full loop with `fedfleet demo`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from server.coordinator import Coordinator, ServeOptions
from server.datadir import DataDir
from server.ingest.broker import free_port
from server.store import Store
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers
from simulations.fleet import SimulatedFleet

console = Console(soft_wrap=True)


async def _until(store: Store, devices: list[str], release: str, label: str, timeout: float) -> float:
    """Wait until the coordinator knows every device runs `release` (status and committed event stored)."""
    start = time.monotonic()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(label, total=len(devices))
        while (done := _committed(store, release)) < len(devices):
            progress.update(task, completed=done)
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{label}: only {done}/{len(devices)} devices committed after {timeout:.0f} s")
            await asyncio.sleep(0.1)
        progress.update(task, completed=len(devices))
    return time.monotonic() - start


def _committed(store: Store, release: str) -> int:
    return store.count_devices(running_release=release, last_event="committed")


async def run(devices: int, out: Path, timeout: float) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    d, _ = DataDir.init(out / "data")
    store = d.store()
    for version, seed in (("1.0.0", 1), ("2.0.0", 2)):
        r = publish_release(
            d.repository(), store, build_dense_model(random_dense_layers([64, 32, 10], seed)), "digits", version
        ).release
        console.print(f"released [bold]{r.id}[/] ({r.length} bytes, sha256 {r.sha256[:12]}…)")
    coordinator = Coordinator(
        d, ServeOptions(grpc_listen="127.0.0.1:0", broker_listen=f"127.0.0.1:{free_port()}", dashboard_listen="")
    )
    serving = asyncio.create_task(coordinator.run())
    await asyncio.sleep(0.5)
    if serving.done():
        serving.result()
    fleet = SimulatedFleet(d, out / "devices", devices, grpc=coordinator.grpc_address, mqtt=coordinator.mqtt_url)
    await fleet.start()
    timings: dict[str, float] = {}
    try:
        start = time.monotonic()
        while len(store.device_ids("sim")) < devices:
            if time.monotonic() - start > timeout:
                raise TimeoutError("devices did not register")
            await asyncio.sleep(0.1)
        console.print(f"{devices} agents registered in {time.monotonic() - start:.1f} s")
        director = d.director()
        for label, release in (("install", "digits@1.0.0"), ("upgrade", "digits@2.0.0"), ("rollback", "digits@1.0.0")):
            ids = store.device_ids("sim")
            director.assign(store, ids, store.release(release))
            timings[label] = await _until(store, ids, release, f"{label:>8} → {release}", timeout)
    finally:
        await fleet.stop()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    table = Table("step", "release", "devices", "seconds")
    for (label, seconds), release in zip(
        timings.items(), ("digits@1.0.0", "digits@2.0.0", "digits@1.0.0"), strict=True
    ):
        table.add_row(label, release, str(devices), f"{seconds:.2f}")
    console.print(table)
    refused = [e for e in store.events() if e["kind"] in ("rejected", "failed", "probe_failed")]
    console.print(f"events stored: {len(store.events(limit=100_000))}, refusals or failures: {len(refused)}")
    console.print(f"coordinator data: {d.root}  (try: fedfleet devices list --data-dir {d.root})")
    store.close()
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=20, help="simulated devices (default 20)")
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory (replaced)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per step")
    args = parser.parse_args()
    if args.devices < 1:
        parser.error("--devices must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(run(args.devices, args.out, args.timeout))
    except TimeoutError as e:
        console.print(f"[red]failed:[/] {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
