"""How a fleet of thousands of real agents behaves on this machine, split over worker processes (one event loop
each), against Mosquitto, a coordinator process and an nginx mirror: time until every device is registered and
online, and time until every device committed a release of `--size-mb` MB assigned to the whole fleet.

    .venv/bin/python benchmarks/fleet_scale.py --devices 10000 [--workers 8] [--baseline 500] [--size-mb 1]

The baseline, in the same run, is a fleet of `--baseline` devices in one worker doing the same; the ratio is
seconds per device at scale over seconds per device at the baseline (1.0 = linear scaling). Target: both ratios
at most 1.5.

Mirror path (the default; `--no-mirror` for the coordinator's gRPC path): the coordinator keeps a static mirror
(`mirror_dirs`, synced by `fedfleet serve`) that nginx serves over HTTPS with a fleet-CA certificate, and every
device lists it in its agent.toml (`mirrors`, `mirror_ca`): metadata and the target come from nginx, the
coordinator only signs and publishes the assignment and takes the events. nginx's log must show one target
download per device.

Memory per device, measured once all devices committed: the workers' summed RSS over devices
(`rss_per_device_mb`), and their summed PSS from /proc/PID/smaps_rollup (`pss_per_device_mb`, shared pages
split between the processes sharing them), with its anonymous part (`anon_pss_per_device_mb`: without the
mmapped model files the interpreters read, but with a shared model's one copy per worker); the same once all are
online, before any model (`online_pss_per_device_mb`, `online_anon_pss_per_device_mb`). Target: PSS at most
0.4 MB per device. Each phase also reports the coordinator process's CPU seconds.

Simulated devices share models (the default; `--no-shared-models` for one interpreter per device): every device
gets `share_models = true` and `xnnpack = false` in its agent.toml (`agent_options` in the JSON). The devices of
one worker that committed the same verified bytes then use one interpreter, loaded without XNNPACK's repacked
copy of the weights; each device still downloads, verifies, installs and probes the release itself, and the
memory figures are measured the same way. A real device keeps the defaults (its own model, XNNPACK on): what
this figure measures is the orchestration's cost per device, not a model per device that one machine simulating
thousands of devices has no reason to hold thousands of times.

The last line is one JSON object: {"benchmark": "fleet_scale", "size_mb", "mirror", "agent_options", "baseline": {...},
"scale": {...}, "ratio_online_per_device", "ratio_commit_per_device", "targets", "met"}.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from server.datadir import DataDir
from server.trust.releases import publish_release
from simulations.dense_tflite import dense_model_of_size
from simulations.fleet_worker import spawn_workers, stop_workers
from simulations.nginx import Nginx, start_mirror
from simulations.processes import CoordinatorProcess, Mosquitto, cpu_seconds, wait_for

RATIO_TARGET = 1.5
MEMORY_TARGET_MB = 0.4
RELEASE = "digits@1.0.0"
SHARED_MODELS = {"share_models": True, "xnnpack": False}  # agent.toml settings for the simulated devices


def _count(d: DataDir, fleet: str, online: bool | None = None, running_release: str | None = None) -> int:
    with d.store() as store:
        return store.count_devices(fleet=fleet, online=online, running_release=running_release)


def _memory_kb(pids: list[int]) -> dict[str, int]:
    """Summed VmRSS, Pss and Pss_Anon (kB) of the given processes (Linux)."""
    total = {"rss": 0, "pss": 0, "anon_pss": 0}
    for pid in pids:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:] if line.endswith("kB")}
        total["rss"] += fields["Rss"]
        total["pss"] += fields["Pss"]
        total["anon_pss"] += fields.get("Pss_Anon", 0)
    return total


def _assign(d: DataDir, fleet: str) -> None:
    command = [sys.executable, "-m", "server.cli", "assign", "--fleet", fleet, RELEASE, "--data-dir", str(d.root)]
    out = subprocess.run([*command, "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["assignments"], out.stdout


def _fleet_run(
    d: DataDir,
    root: Path,
    broker: Mosquitto,
    coordinator: CoordinatorProcess,
    n: int,
    workers: int,
    rate: float,
    nginx: Nginx | None,
    agent_options: dict[str, Any],
) -> dict[str, Any]:
    fleet = f"scale{uuid.uuid4().hex[:6]}"
    extra = {"mirrors": [nginx.url], "mirror_ca": str((d.trust / "ca.pem").resolve())} if nginx else {}
    extra.update(agent_options)
    assert coordinator.proc is not None
    pid = coordinator.proc.pid
    served0 = len(nginx.requests()) if nginx else 0
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    procs = spawn_workers(
        d, root, fleet, n, workers, coordinator.endpoints["grpc"], broker.url, rate=rate, agent_extra=extra
    )
    try:
        wait_for(lambda: _count(d, fleet, online=True) == n, 120 + n * 0.2, 0.25, what=f"{n} devices online")
        t_online, cpu_online = time.monotonic() - t0, cpu_seconds(pid) - cpu0
        online_memory = _memory_kb([p.pid for p in procs])  # connected, no model yet
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
        _assign(d, fleet)
        wait_for(
            lambda: _count(d, fleet, running_release=RELEASE) == n,
            120 + n * 0.2,
            0.25,
            what=f"{n} devices committed",
        )
        t_commit, cpu_commit = time.monotonic() - t1, cpu_seconds(pid) - cpu1
        memory = _memory_kb([p.pid for p in procs])
        served = None
        if nginx is not None:
            served = sum(r.uri.startswith("/targets/") and r.status == 200 for r in nginx.requests()[served0:])
            if served < n:
                raise RuntimeError(f"nginx served {served} targets to {n} devices: some came over gRPC")
        return {
            "devices": n,
            "workers": workers,
            "online_seconds": round(t_online, 3),
            "commit_seconds": round(t_commit, 3),
            "coordinator_cpu_seconds": {"online": round(cpu_online, 2), "commit": round(cpu_commit, 2)},
            "mirror_targets_served": served,
            "worker_rss_mb": round(memory["rss"] / 1024, 1),
            "worker_pss_mb": round(memory["pss"] / 1024, 1),
            "rss_per_device_mb": round(memory["rss"] / 1024 / n, 4),
            "pss_per_device_mb": round(memory["pss"] / 1024 / n, 4),
            "anon_pss_per_device_mb": round(memory["anon_pss"] / 1024 / n, 4),
            "online_pss_per_device_mb": round(online_memory["pss"] / 1024 / n, 4),
            "online_anon_pss_per_device_mb": round(online_memory["anon_pss"] / 1024 / n, 4),
        }
    finally:
        stop_workers(procs)


def _raise_file_limit(needed: int) -> int:
    """Raise this process's soft descriptor limit (inherited by Mosquitto, the coordinator, nginx and the
    workers) towards the hard one; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        soft = hard if hard == resource.RLIM_INFINITY else max(soft, min(hard, needed))
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000, help="devices at scale (default 10000)")
    parser.add_argument("--workers", type=int, default=8, help="worker processes at scale (default 8)")
    parser.add_argument("--baseline", type=int, default=500, help="devices in the one-worker baseline (default 500)")
    parser.add_argument("--size-mb", type=float, default=1.0, help="release size in MB (default 1)")
    parser.add_argument("--rate", type=float, default=1.0, help="inferences per device per second (default 1)")
    parser.add_argument(
        "--mirror",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="metadata and targets from an nginx mirror (default); --no-mirror: from the coordinator over gRPC",
    )
    parser.add_argument(
        "--shared-models",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="devices of a worker share one interpreter per model, without XNNPACK (default); "
        "--no-shared-models: each device loads its own, as a real device does",
    )
    args = parser.parse_args()
    agent_options = dict(SHARED_MODELS) if args.shared_models else {}
    if min(args.devices, args.workers, args.baseline) < 1 or args.size_mb <= 0:
        parser.error("--devices, --workers, --baseline and --size-mb must be positive")
    # The limit is per process: the broker and the coordinator each hold a connection per device (the coordinator
    # also its MQTT session, SQLite and the mirror's files), a worker two per device of its share.
    limit = _raise_file_limit(2 * args.devices + 1024)
    if limit < args.devices + 1024:
        print(f"warning: the descriptor limit is {limit}; {args.devices} devices may not all connect", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedfleet-scale-") as tmp:
        root = Path(tmp)
        broker = Mosquitto(root / "mosquitto")
        d, _ = DataDir.init(root / "data")
        model = dense_model_of_size(args.size_mb)
        with d.store() as store:
            publish_release(d.repository(), store, model, "digits", "1.0.0")
        if args.mirror:  # serve syncs it on its first tick and on every new timestamp
            d.set_config("mirror_dirs", str(root / "mirror"))
        coordinator = CoordinatorProcess(d, broker.url).start()
        nginx = None
        try:
            nginx = start_mirror(d, root) if args.mirror else None
            print(f"release: {len(model) / 1e6:.2f} MB; mirror: {nginx.url if nginx else 'none'}", flush=True)
            base = _fleet_run(d, root, broker, coordinator, args.baseline, 1, args.rate, nginx, agent_options)
            print(f"baseline: {json.dumps(base)}", flush=True)
            scale = _fleet_run(
                d, root, broker, coordinator, args.devices, args.workers, args.rate, nginx, agent_options
            )
            print(f"at scale: {json.dumps(scale)}", flush=True)
        finally:
            if nginx is not None:
                nginx.stop()
            coordinator.kill()
            broker.stop()
    ratio_online = (scale["online_seconds"] / scale["devices"]) / (base["online_seconds"] / base["devices"])
    ratio_commit = (scale["commit_seconds"] / scale["devices"]) / (base["commit_seconds"] / base["devices"])
    print(
        f"{args.devices} devices in {args.workers} workers: online in {scale['online_seconds']:.1f} s, all committed "
        f"{scale['commit_seconds']:.1f} s after the assignment, {scale['pss_per_device_mb']:.3f} MB (PSS) per "
        f"device; seconds per device vs {args.baseline} in one worker: online x{ratio_online:.2f}, "
        f"commit x{ratio_commit:.2f}"
    )
    result = {
        "benchmark": "fleet_scale",
        "size_mb": round(len(model) / 1e6, 3),
        "mirror": args.mirror,
        "agent_options": agent_options,
        "baseline": base,
        "scale": scale,
        "ratio_online_per_device": round(ratio_online, 3),
        "ratio_commit_per_device": round(ratio_commit, 3),
        "targets": {"ratio_per_device_max": RATIO_TARGET, "pss_per_device_mb_max": MEMORY_TARGET_MB},
        "met": {
            "online_ratio": ratio_online <= RATIO_TARGET,
            "commit_ratio": ratio_commit <= RATIO_TARGET,
            "memory": scale["pss_per_device_mb"] <= MEMORY_TARGET_MB,
        },
    }
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
