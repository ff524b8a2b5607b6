"""Fan-out: time from `fedfleet assign --fleet` until N agents have committed an S MB release, next to the bare
floor measured in the same run through the same broker.

    python benchmarks/fanout.py --devices 1000 --size-mb 1

fedfleet path: a coordinator process (`fedfleet serve` on the broker) and N real agents in this process, one
event loop (each agent its own state dir, MQTT session and gRPC channel). The clock starts when the
`fedfleet assign --fleet` command is started and stops when the last agent has committed: signed assignment
over MQTT, TUF metadata refresh and the target over gRPC, length-capped download, hash check, fsync, rename into
the inactive slot, interpreter load and probe, atomic slot switch.

Floor: the same bytes published by another process to N plain MQTT subscribers in this process, each of which
hashes what it got and writes it to a file with fsync (the least any safe update must do). The clock starts
when the publisher is told to go and stops when the last file is fsynced. It runs once before and once after
the fedfleet path and the ratio is taken against their mean.

Fair phases: on these VMs, writing files gets slower as the page cache grows (the same 1,000-subscriber floor,
repeated in one process, took 3.3, 3.9, 6.4, 6.8 s, the extra all kernel time; with the page cache dropped
before each, 3.2-3.6 s). So every timed phase starts after `sync` and, where allowed (root on Linux), after
dropping the clean page cache; and besides wall time each phase reports the CPU seconds of every process in
it (this one, the coordinator or the publisher, the broker), a figure less at the mercy of scheduling.

Mirror path (`--mirror`): after the gRPC path, a second fleet of N fresh agents updates to the same release with
`mirrors` in their agent.toml: metadata and the target come from a static mirror (`fedfleet mirror sync`)
served by nginx (Debian's package, started here on a free loopback port, TLS with a fleet-CA certificate); the
coordinator only signs and publishes assignments, answers each device's freshness check and takes its events.
A fallback to the coordinator (a `failed` event) fails the run; nginx's log must show N target downloads.

What a real fleet shares is the coordinator, so the figure per path is `coordinator_cpu_ms_per_update`: the
coordinator process's CPU during the fan-out divided by N. The simulated agents' CPU per update (one process
here, each real device brings its own) is `agent_cpu_ms_per_update`, informational.

Profiling (`--profile DIR`): py-spy (`.venv/bin/py-spy`, or on PATH) records the coordinator process during each
fan-out, from the assign to the last commit, into DIR/coordinator-PATH.speedscope.json (open it in
https://speedscope.app); `--profile-native` adds native frames (gRPC's C core, SQLite). Sampling costs the
coordinator a little CPU, so a profiled run's figures are not the ones to quote.

The last line is one JSON object: {"benchmark": "fanout", "devices", "size_mb", "seconds", "floor_seconds",
"ratio", "floor_before_seconds", "floor_after_seconds", "cpu_seconds", "floor_cpu_seconds", "cpu_ratio",
"page_cache_dropped", "coordinator_cpu_ms_per_update": {"grpc", "mirror"}, "agent_cpu_ms_per_update": {...},
"coordinator_idle_cpu_ms_per_second": {...}, "device_messages_per_update": {...}, "seconds_by_path": {...}, ...}.
The idle figure is the coordinator's CPU over 5 s with the fleet connected, before the assignment (its tick and
keepalives: the part of the fan-out's CPU that is not the updates'); the messages are the status and event
messages devices published during the fan-out and until their count settles (1 s without one), counted by a
subscriber in a process of its own. Absolute times mean little on a shared machine; the ratios are the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiomqtt

from edge_agent.contract import Topics
from server.datadir import DataDir
from server.trust.releases import publish_release
from simulations.dense_tflite import dense_model_of_size
from simulations.fleet import SimulatedFleet
from simulations.nginx import Nginx, start_mirror
from simulations.processes import CoordinatorProcess, MessageCounter, Mosquitto, cpu_seconds, descendants

_IDLE_SECONDS = 5.0  # the coordinator's idle CPU is measured over this long before each fan-out

PUBLISHER = r"""
import sys, paho.mqtt.client as paho
host, port, n, size, prefix = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="floor-publisher")
c.max_queued_messages_set(0)
c.connect(host, port)
c.loop_start()
print("ready", flush=True)
sys.stdin.readline()
infos = [c.publish(f"{prefix}/{i}", payload, qos=1) for i in range(n)]
for info in infos:
    info.wait_for_publish(600)
print("done", flush=True)
c.loop_stop()
"""


def _owncpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _settle_page_cache() -> bool:
    """Write back and drop the clean page cache, so that each timed phase starts from the same memory state.
    Returns whether it could (root on Linux only); without it the phases still run, less comparably."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
    except OSError:
        return False
    return True


def _machinecpu_seconds(*pids: int) -> float:
    """CPU of this process, its finished children (the publisher, `fedfleet assign`) and the given processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return _owncpu_seconds() + children.ru_utime + children.ru_stime + sum(cpu_seconds(p) for p in pids)


async def _floor(broker: Mosquitto, n: int, size: int, out: Path, timeout: float) -> tuple[float, float]:
    """Seconds until the last subscriber fsynced, and the CPU seconds this took in all processes involved."""
    prefix = f"floor/{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    done = 0
    all_done = asyncio.Event()
    subscribed = 0
    all_subscribed = asyncio.Event()

    def persist(i: int, payload: bytes) -> None:
        digest = hashlib.sha256(payload).hexdigest()
        with open(out / f"{i}-{digest[:16]}", "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())

    async def subscriber(i: int) -> None:
        nonlocal done, subscribed
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier=f"floor-{i}", timeout=60) as client:
            await client.subscribe(f"{prefix}/{i}", qos=1)
            subscribed += 1
            if subscribed == n:
                all_subscribed.set()
            async for message in client.messages:
                await asyncio.to_thread(persist, i, bytes(message.payload))  # type: ignore[arg-type]
                done += 1
                if done == n:
                    all_done.set()
                return

    tasks = [asyncio.create_task(subscriber(i)) for i in range(n)]
    await asyncio.wait_for(all_subscribed.wait(), timeout)
    publisher = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, "127.0.0.1", str(broker.port), str(n), str(size), prefix],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert publisher.stdout is not None and publisher.stdin is not None
    assert (await asyncio.to_thread(publisher.stdout.readline)).strip() == "ready"
    assert broker.proc is not None
    _settle_page_cache()
    cpu0 = _machinecpu_seconds(broker.proc.pid)
    start = time.monotonic()
    publisher.stdin.write("go\n")
    publisher.stdin.flush()
    await asyncio.wait_for(all_done.wait(), timeout)
    elapsed = time.monotonic() - start
    publisher.wait(60)
    cpu = _machinecpu_seconds(broker.proc.pid) - cpu0
    await asyncio.gather(*tasks)
    return elapsed, cpu


def _start_profiler(pid: int, out: Path, native: bool) -> subprocess.Popen[bytes]:
    """py-spy recording `pid` into `out` (speedscope) until `_stop_profiler`."""
    py_spy = Path(sys.executable).with_name("py-spy")
    found = str(py_spy) if py_spy.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [found, "record", "--pid", str(pid), "--format", "speedscope", "--rate", "100", "--gil", "-o", str(out)]
    proc = subprocess.Popen([*args, *(["--native"] if native else [])], stdout=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the clock starts
    return proc


def _stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    """Stop recording; py-spy writes its file on SIGINT."""
    proc.send_signal(signal.SIGINT)
    proc.wait(120)


def _treecpu_seconds(pid: int) -> float:
    """CPU of a process and its children (nginx's master and workers)."""
    total = 0.0
    for p in (pid, *descendants(pid)):
        with contextlib.suppress(OSError):  # a worker gone meanwhile
            total += cpu_seconds(p)
    return total


async def _fedfleet(
    d: DataDir,
    coordinator: CoordinatorProcess,
    broker: Mosquitto,
    n: int,
    root: Path,
    timeout: float,
    workers: int,
    fleet_name: str = "bench",
    nginx: Nginx | None = None,
    profile: Path | None = None,
    profile_native: bool = False,
) -> tuple[float, dict[str, float]]:
    """One fan-out to a fleet of fresh agents; with `nginx`, the agents take metadata and targets from it."""
    extra = {"mirrors": [nginx.url], "mirror_ca": str((d.trust / "ca.pem").resolve())} if nginx else {}
    fleet = SimulatedFleet(
        d,
        root,
        n,
        fleet=fleet_name,
        grpc=coordinator.endpoints["grpc"],
        mqtt=coordinator.endpoints["mqtt"],
        workers=workers,
        agent_extra=extra,
    )
    # What devices publish to the coordinator (status and events: each one a message it reads), counted apart
    topics = Topics(d.config().topic_prefix)
    counter = MessageCounter(broker.port, [topics.status("+"), topics.events("+")], 0, "fanout-counter")
    t0 = time.monotonic()
    await fleet.start()
    store = d.store()
    try:
        deadline = time.monotonic() + timeout
        while len(store.device_ids(fleet_name)) < n or fleet.connected() < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {fleet.connected()}/{n} agents connected")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # let retained status and subscriptions settle
        connect_seconds = time.monotonic() - t0
        assert coordinator.proc is not None and broker.proc is not None
        pids = (coordinator.proc.pid, broker.proc.pid)
        profiler = None
        if profile is not None:
            out = profile / f"coordinator-{'mirror' if nginx else 'grpc'}.speedscope.json"
            profiler = _start_profiler(coordinator.proc.pid, out, profile_native)
        # The coordinator's own cost of a connected, idle fleet (its tick, keepalives), over the same span before
        # the assignment: what the fan-out's CPU would be if the updates cost nothing.
        idle0 = cpu_seconds(coordinator.proc.pid)
        await counter.ready()
        await asyncio.sleep(_IDLE_SECONDS)
        idle_cpu_per_second = (cpu_seconds(coordinator.proc.pid) - idle0) / _IDLE_SECONDS
        _settle_page_cache()
        cpu0 = (cpu_seconds(coordinator.proc.pid), _owncpu_seconds(), _machinecpu_seconds(*pids))
        nginx_cpu0 = _treecpu_seconds(nginx.proc.pid) if nginx is not None and nginx.proc is not None else 0.0
        logged0 = len(nginx.requests()) if nginx is not None else 0
        start = time.monotonic()
        await counter.reset()  # the retained ones delivered on subscribing, and any of the idle span, not counted
        assign = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server.cli",
            "assign",
            "digits@1.0.0",
            "--fleet",
            fleet_name,
            "--data-dir",
            str(d.root),
            stdout=asyncio.subprocess.DEVNULL,
        )
        committed = 0
        while committed < n:
            committed = sum(a.model is not None for a in fleet.agents)
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"only {committed}/{n} agents committed after {timeout:.0f} s")
            await asyncio.sleep(0.02)
        elapsed = time.monotonic() - start
        cpu = (cpu_seconds(coordinator.proc.pid) - cpu0[0], _owncpu_seconds() - cpu0[1])
        if profiler is not None:
            _stop_profiler(profiler)
        assert await assign.wait() == 0
        machine_cpu = _machinecpu_seconds(*pids) - cpu0[2]
        nginx_cpu = _treecpu_seconds(nginx.proc.pid) - nginx_cpu0 if nginx is not None and nginx.proc else 0.0
        messages = await counter.settled()  # after every CPU figure: this waits for the count to stop changing
        failures = [e for e in store.events(limit=100_000) if e["kind"] in ("rejected", "failed", "probe_failed")]
        if failures:
            raise RuntimeError(f"{len(failures)} update failures, first: {failures[0]}")
        if nginx is not None:
            served = [r for r in nginx.requests()[logged0:] if r.uri.startswith("/targets/") and r.status == 200]
            if len(served) < n:
                raise RuntimeError(f"nginx served {len(served)} targets to {n} devices: some came over gRPC")
    finally:
        counter.stop()
        store.close()
        await fleet.stop()
    return elapsed, {
        "connect_seconds": round(connect_seconds, 2),
        "coordinator_cpu_seconds": round(cpu[0], 2),
        "fleet_process_cpu_seconds": round(cpu[1], 2),
        "cpu_seconds": round(machine_cpu, 2),
        "coordinator_cpu_ms_per_update": round(cpu[0] * 1000 / n, 3),
        "coordinator_idle_cpu_ms_per_second": round(idle_cpu_per_second * 1000, 2),
        "device_messages_per_update": round(messages / n, 2),
        "agent_cpu_ms_per_update": round(cpu[1] * 1000 / n, 3),
        "mirror_server_cpu_ms_per_update": round(nginx_cpu * 1000 / n, 3),
    }


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # The floor's subscribers hash and fsync on the default executor: the same size before as after the fleet.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(args.workers, thread_name_prefix="floor"))
    page_cache_dropped = _settle_page_cache()
    with tempfile.TemporaryDirectory(prefix="fanout-", dir=args.workdir) as tmp:
        root = Path(tmp)
        broker = Mosquitto(root / "broker")
        coordinator = None
        try:
            d, _ = DataDir.init(root / "data")
            store = d.store()
            model = dense_model_of_size(args.size_mb)
            publish_release(d.repository(), store, model, "digits", "1.0.0")
            store.close()
            print(f"release: {len(model) / 1e6:.2f} MB; broker: mosquitto :{broker.port}", flush=True)

            async def floor(when: str) -> tuple[float, float]:
                if args.skip_floor:
                    return float("nan"), float("nan")
                seconds, cpu = await _floor(broker, args.devices, len(model), root / f"floor-{when}", args.timeout)
                shutil.rmtree(root / f"floor-{when}")
                print(
                    f"floor ({when}): {args.devices} subscribers hashed and fsynced in {seconds:.2f} s "
                    f"({cpu:.2f} CPU seconds in all processes)",
                    flush=True,
                )
                return seconds, cpu

            floors = [await floor("before")]
            if args.mirror:  # serve syncs it on its first tick and on every new timestamp
                d.set_config("mirror_dirs", str(root / "mirror"))
            coordinator = CoordinatorProcess(d, broker.url).start()
            seconds, extra = await _fedfleet(
                d,
                coordinator,
                broker,
                args.devices,
                root / "devices",
                args.timeout,
                args.workers,
                profile=args.profile,
                profile_native=args.profile_native,
            )
            print(
                f"fedfleet: {args.devices} devices committed in {seconds:.2f} s "
                f"({extra['cpu_seconds']:.2f} CPU seconds in all processes)",
                flush=True,
            )
            by_path = {"grpc": extra}
            if args.mirror:
                nginx = start_mirror(d, root)
                try:
                    mirror_seconds, by_path["mirror"] = await _fedfleet(
                        d,
                        coordinator,
                        broker,
                        args.devices,
                        root / "mirror-devices",
                        args.timeout,
                        args.workers,
                        fleet_name="mirror",
                        nginx=nginx,
                        profile=args.profile,
                        profile_native=args.profile_native,
                    )
                finally:
                    nginx.stop()
                by_path["mirror"]["seconds"] = mirror_seconds
                print(
                    f"fedfleet through the mirror: {args.devices} devices committed in {mirror_seconds:.2f} s",
                    flush=True,
                )
            extra["seconds"] = seconds
            coordinator.kill()
            coordinator = None
            floors.append(await floor("after"))
            floor_mean = (floors[0][0] + floors[1][0]) / 2
            floor_cpu = (floors[0][1] + floors[1][1]) / 2
        finally:
            if coordinator is not None:
                coordinator.kill()
            broker.stop()
    return {
        "benchmark": "fanout",
        "devices": args.devices,
        "size_mb": round(len(model) / 1e6, 3),
        "seconds": round(seconds, 3),
        "floor_seconds": round(floor_mean, 3),
        "ratio": None if math.isnan(floor_mean) else round(seconds / floor_mean, 2),
        "floor_before_seconds": round(floors[0][0], 3),
        "floor_after_seconds": round(floors[1][0], 3),
        "floor_cpu_seconds": round(floor_cpu, 2),
        "cpu_ratio": None if math.isnan(floor_cpu) else round(extra["cpu_seconds"] / floor_cpu, 2),
        "page_cache_dropped": page_cache_dropped,
        **{k: v for k, v in extra.items() if not k.endswith(("per_update", "per_second")) and k != "seconds"},
        **{
            figure: {path: figures[figure] for path, figures in by_path.items()}
            for figure in (
                "coordinator_cpu_ms_per_update",
                "coordinator_idle_cpu_ms_per_second",
                "device_messages_per_update",
                "agent_cpu_ms_per_update",
            )
        },
        "seconds_by_path": {path: round(figures["seconds"], 3) for path, figures in by_path.items()},
        "mirror_server_cpu_ms_per_update": by_path["mirror"]["mirror_server_cpu_ms_per_update"]
        if args.mirror
        else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100, help="simulated devices (default 100)")
    parser.add_argument("--size-mb", type=float, default=1.0, help="release size in MB (default 1)")
    parser.add_argument("--workers", type=int, default=16, help="threads for blocking update work (default 16)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per phase")
    parser.add_argument("--skip-floor", action="store_true", help="measure only fedfleet's path (for profiling)")
    parser.add_argument(
        "--mirror", action="store_true", help="also fan out through an nginx mirror (fresh agents), after gRPC"
    )
    parser.add_argument(
        "--profile", type=Path, default=None, help="record the coordinator with py-spy into this directory (speedscope)"
    )
    parser.add_argument("--profile-native", action="store_true", help="with --profile: native frames too")
    parser.add_argument("--workdir", type=Path, default=None, help="where temporary files go (default: system tmp)")
    args = parser.parse_args()
    if args.devices < 1 or args.size_mb <= 0:
        parser.error("--devices and --size-mb must be positive")
    result = asyncio.run(main_async(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
