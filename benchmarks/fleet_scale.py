"""How a fleet of thousands of real agents behaves on this machine, split over worker processes (one event loop
each), against Mosquitto and a coordinator process: time until every device is registered and online, and
time until every device committed a release assigned to the whole fleet.

The baseline, in the same run, is a fleet of `--baseline` devices in one worker doing the same; the ratio is
seconds per device at scale over seconds per device at the baseline (1.0 = linear scaling).

    .venv/bin/python benchmarks/fleet_scale.py --devices 5000 --workers 4 [--baseline 500]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from server.datadir import DataDir
from server.trust.releases import publish_release
from simulations.fleet_worker import spawn_workers, stop_workers
from simulations.models import ModelFamily
from simulations.processes import CoordinatorProcess, Mosquitto, wait_for


def _count(d: DataDir, fleet: str, online: bool | None = None, running_release: str | None = None) -> int:
    with d.store() as store:
        return store.count_devices(fleet=fleet, online=online, running_release=running_release)


def _fleet_run(
    d: DataDir, root: Path, broker: Mosquitto, coordinator: CoordinatorProcess, n: int, workers: int
) -> dict[str, float]:
    fleet = f"scale{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    procs = spawn_workers(d, root, fleet, n, workers, coordinator.endpoints["grpc"], broker.url)
    try:
        wait_for(lambda: _count(d, fleet, online=True) == n, 120 + n * 0.2, 1.0, what=f"{n} devices online")
        t_online = time.monotonic() - t0
        t1 = time.monotonic()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "server.cli",
                "assign",
                "--fleet",
                fleet,
                "digits@1.0.0",
                "--data-dir",
                str(d.root),
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(out.stdout)["assignments"], out.stdout
        wait_for(
            lambda: _count(d, fleet, running_release="digits@1.0.0") == n,
            120 + n * 0.2,
            1.0,
            what=f"{n} devices committed",
        )
        t_commit = time.monotonic() - t1
        rss = 0
        for p in procs:
            with open(f"/proc/{p.pid}/status") as f:
                rss += next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
        return {
            "devices": n,
            "workers": workers,
            "online_seconds": t_online,
            "commit_seconds": t_commit,
            "worker_rss_mb": rss / 1024,
            "rss_per_device_mb": rss / 1024 / n,
        }
    finally:
        stop_workers(procs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--baseline", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedfleet-scale-") as tmp:
        root = Path(tmp)
        broker = Mosquitto(root / "mosquitto")
        d, _ = DataDir.init(root / "data")
        store = d.store()
        try:
            publish_release(d.repository(), store, ModelFamily().base(), "digits", "1.0.0")
        finally:
            store.close()
        coordinator = CoordinatorProcess(d, broker.url).start()
        try:
            base = _fleet_run(d, root, broker, coordinator, args.baseline, 1)
            print(f"baseline: {json.dumps({k: round(v, 3) for k, v in base.items()})}", flush=True)
            scale = _fleet_run(d, root, broker, coordinator, args.devices, args.workers)
            print(f"at scale: {json.dumps({k: round(v, 3) for k, v in scale.items()})}", flush=True)
        finally:
            coordinator.kill()
            broker.stop()
    ratio_online = (scale["online_seconds"] / scale["devices"]) / (base["online_seconds"] / base["devices"])
    ratio_commit = (scale["commit_seconds"] / scale["devices"]) / (base["commit_seconds"] / base["devices"])
    print(
        f"{args.devices} devices in {args.workers} workers: online in {scale['online_seconds']:.1f} s, all committed "
        f"{scale['commit_seconds']:.1f} s after the assignment, {scale['rss_per_device_mb']:.2f} MB per device; "
        f"seconds per device vs {args.baseline} in one worker: online x{ratio_online:.2f}, commit x{ratio_commit:.2f}"
    )
    result = {
        "benchmark": "fleet_scale",
        "baseline": base,
        "scale": scale,
        "ratio_online_per_device": round(ratio_online, 3),
        "ratio_commit_per_device": round(ratio_commit, 3),
    }
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
