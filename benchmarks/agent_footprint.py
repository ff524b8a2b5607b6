"""Agent footprint: memory, cold start, inference latency, the drift statistics' cost, installed size.

    python benchmarks/agent_footprint.py [--inferences 5000] [--runs 5] [--clients 16] [--skip-venv] [--plain]

- inference p50/p99 and the drift update's cost per inference as a ratio to the inference itself, measured on
  the same inputs in this process (a digits-shaped model: 64 inputs, 10 classes, with a drift reference);
- RSS of a real `fedfleet-agent run` process with the model committed and a live broker connection, after
  serving inferences through its local endpoint (200 per client; --clients N callers at once): in steady state
  (restarted on its committed model, which is how a device spends its life) and right after applying the update
  (python-tuf, securesystemslib and urllib3 loaded, about 110 modules that stay). The process runs as the systemd
  unit runs it: with the unit's Environment= (-OO, no docstrings: about 3 MB) and its bytecode compiled
  beforehand as install.sh compiles it; --plain runs it without them, for comparison;
- cold start: from starting that process (model already committed) to its first answered inference;
- with --runs N, those process figures N times, each with a fresh coordinator and agent: the RSS figures are then
  the largest of the runs (the target holds in every run or not at all), with min/median/max beside them, and
  the agent's threads and glibc malloc arenas (the run-to-run spread came from arenas, one per thread that
  allocated while serving: more callers at once, more threads, more arenas; edge_agent/memory.py bounds them;
  a module the agent compiles itself, lacking its bytecode, added up to 1.5 MB in some runs: edge_agent.bytecode
  compiles them ahead; what is left, 0.0-0.2 MB over 5 runs, is a malloc arena or gRPC thread more or less);
- installed size of a virtualenv with the agent alone (no extras), as deploy/raspberry-pi/install.sh leaves it
  (slimmed: no pip, no test suites, no accelerators a Pi cannot use), next to a plain `pip install`.
Targets: RSS <= 80 MB, drift cost <= 0.5, venv <= 150 MB. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2_grpc as pb_grpc
from edge_agent.contract.drift import DriftReference
from edge_agent.runtime import load_model
from edge_agent.telemetry import TelemetryRecorder
from server.datadir import DataDir
from server.trust.enrollment import write_bundle
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers
from simulations.processes import AgentProcess, CoordinatorProcess, wait_for

REPO = Path(__file__).resolve().parent.parent
KIT = REPO / "deploy" / "raspberry-pi"
FEATURES, CLASSES = 64, 10


def _reference() -> DriftReference:
    return DriftReference.from_samples(np.random.default_rng(0).random((4000, FEATURES)), CLASSES)


def _latency_and_drift_cost(model_path: Path, n: int, passes: int = 5) -> dict[str, float]:
    """Inference latency, and the drift update's cost per inference as a ratio to the inference: the best of
    `passes` passes over the same inputs for each (best-of, as timeit does: this machine's noise only ever adds)."""
    model = load_model(model_path)
    reference = _reference()
    xs = np.random.default_rng(1).random((n, FEATURES), dtype=np.float32)
    for x in xs[:200]:
        model.predict(x)  # warm up
    predict_ns = np.empty(n, np.int64)
    predict_total, record_total = [], []
    for _ in range(passes):
        outputs = []
        for i, x in enumerate(xs):
            t = time.perf_counter_ns()
            outputs.append(model.predict(x))
            predict_ns[i] = time.perf_counter_ns() - t
        predict_total.append(int(predict_ns.sum()))
        latencies = (predict_ns / 1e6).tolist()  # the agent measures latency as a float, outside the recorder
        recorder = TelemetryRecorder(lambda w: None, every_inferences=500, every_seconds=3600)
        recorder.switch("bench@1", reference)
        start = time.perf_counter_ns()
        for x, y, latency in zip(xs, outputs, latencies, strict=True):
            # As Agent.run_inference does, which holds one lock per inference: the serving lock, which is both the
            # interpreter's (model.predict takes its own here) and the recorder's.
            recorder.record_one("bench@1", x, y, latency)
        recorder.close()  # the last rows' folding counts too
        record_total.append(time.perf_counter_ns() - start)
    return {
        "inference_p50_ms": round(float(np.percentile(predict_ns, 50)) / 1e6, 4),
        "inference_p99_ms": round(float(np.percentile(predict_ns, 99)) / 1e6, 4),
        "drift_cost_ratio": round(min(record_total) / min(predict_total), 3),
    }


def _infer_once(endpoint: str) -> bool:
    with grpc.insecure_channel(endpoint) as channel:
        try:
            pb_grpc.AgentLocalStub(channel).Infer(pb.InferRequest(input=[0.5] * FEATURES), timeout=2)
        except grpc.RpcError:
            return False
    return True


def _serve(endpoint: str, clients: int) -> None:
    """200 inferences per client through the local endpoint, from `clients` callers at once (each call its own
    channel, as separate applications' calls would be)."""
    if clients == 1:
        for _ in range(200):
            _infer_once(endpoint)
        return
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: _infer_once(endpoint), range(200 * clients)))


def unit_environment(pycache: Path) -> dict[str, str]:
    """The environment the systemd unit gives the agent (its Environment= lines), with its bytecode in `pycache`."""
    env: dict[str, str] = {}
    for line in (KIT / "fedfleet-agent.service.in").read_text().splitlines():
        if line.startswith("Environment="):
            env.update(item.split("=", 1) for item in line.removeprefix("Environment=").split())
    return {k: v.replace("@PYCACHE@", str(pycache)) for k, v in env.items()}


def _compile_as_installed(env: dict[str, str]) -> None:
    """The unit's bytecode cache, filled as install.sh fills it (this process's environment may forbid writing
    bytecode: PYTHONDONTWRITEBYTECODE)."""
    child = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | env
    subprocess.run([sys.executable, "-m", "edge_agent.bytecode"], check=True, capture_output=True, env=child)


@dataclass
class _UnitAgent(AgentProcess):
    """`fedfleet-agent run` with extra environment (the unit's)."""

    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> _UnitAgent:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,  # AgentProcess.kill stops the process group
            )
        return self


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _threads_and_arenas(pid: int) -> tuple[int, int]:
    """The process's threads, and its glibc malloc arenas besides the main one: each is a heap of its own, an
    anonymous mapping aligned to the arena size (64 MiB on 64-bit)."""
    threads = len(list(Path(f"/proc/{pid}/task").iterdir()))
    arenas = 0
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        start = int(fields[0].split("-")[0], 16)
        if len(fields) == 5 and fields[1].startswith("rw") and start % (64 << 20) == 0:
            arenas += 1
    return threads, arenas


def _process_figures(root: Path, model: bytes, clients: int, env: dict[str, str]) -> dict[str, float]:
    d, _ = DataDir.init(root / "data")
    store = d.store()
    release = publish_release(
        d.repository(), store, model, "digits", "1.0.0", extra={"drift_reference": _reference().to_metadata()}
    ).release
    coordinator = CoordinatorProcess(d, None).start()  # embedded broker
    config = write_bundle(
        d, "pi-bench", root / "pi-bench", "lab", {}, coordinator.endpoints["grpc"], coordinator.endpoints["mqtt"]
    )
    agent = _UnitAgent(root / "pi-bench" / "agent.toml", config, env=env)
    try:
        agent.start()
        wait_for(lambda: store.is_device("pi-bench"), 60, what="registration")
        d.director().assign(store, ["pi-bench"], release)
        wait_for(lambda: agent.status()["release"] == "digits@1.0.0", 60, what="commit")
        wait_for(lambda: _infer_once(config.local_endpoint), 30, what="local endpoint")
        _serve(config.local_endpoint, clients)
        assert agent.proc is not None
        rss_after_update = _rss_mb(agent.proc.pid)
        agent.kill()
        start = time.monotonic()
        agent.start()
        wait_for(lambda: _infer_once(config.local_endpoint), 60, interval=0.01, what="first inference after start")
        cold = time.monotonic() - start
        _serve(config.local_endpoint, clients)
        rss = _rss_mb(agent.proc.pid)
        threads, arenas = _threads_and_arenas(agent.proc.pid)
    finally:
        agent.kill()
        coordinator.kill()
        store.close()
    return {
        "rss_mb": round(rss, 1),
        "rss_after_update_mb": round(rss_after_update, 1),
        "cold_start_seconds": round(cold, 2),
        "threads": threads,
        "malloc_arenas": arenas,
    }


def _repeated(root: Path, model: bytes, runs: int, clients: int, env: dict[str, str]) -> dict[str, object]:
    """The process figures `runs` times over; the RSS figures are the largest run's, the spread beside them."""
    each = [_process_figures(root / f"run-{i}", model, clients, env) for i in range(runs)]
    if runs == 1:
        return dict(each[0])
    out: dict[str, object] = {"runs": runs}
    for key in ("rss_mb", "rss_after_update_mb"):
        values = sorted(e[key] for e in each)
        out[key] = values[-1]
        out[f"{key}_runs"] = [e[key] for e in each]
        out[f"{key}_min_median_max"] = [values[0], values[len(values) // 2], values[-1]]
        out[f"{key}_spread"] = round(values[-1] - values[0], 1)
    out["cold_start_seconds"] = sorted(e["cold_start_seconds"] for e in each)[len(each) // 2]  # median
    out["threads_runs"] = [e["threads"] for e in each]
    out["malloc_arenas_runs"] = [e["malloc_arenas"] for e in each]
    return out


def _tree_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6, 1)


def _venv_mb(root: Path) -> dict[str, float]:
    """The agent-only virtualenv as a Raspberry Pi gets it (deploy/raspberry-pi/install.sh, slimmed), and as a
    plain `pip install` of the agent leaves it, for comparison."""
    d, _ = DataDir.init(root / "venv-data")
    write_bundle(d, "pi-size", root / "venv-bundle", "lab", {})
    pi = root / "pi"
    install = REPO / "deploy" / "raspberry-pi" / "install.sh"
    command = ["bash", str(install), "--bundle", str(root / "venv-bundle"), "--prefix", str(pi), "--package", str(REPO)]
    subprocess.run(command, check=True, capture_output=True)
    installed = _tree_mb(pi / "opt" / "fedfleet-agent" / "venv")
    shutil.rmtree(pi)
    venv = root / "agent-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", str(REPO)], check=True, capture_output=True)
    plain = _tree_mb(venv)
    shutil.rmtree(venv)
    return {"venv_mb": installed, "venv_plain_pip_mb": plain}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inferences", type=int, default=5000, help="inferences timed in process (default 5000)")
    parser.add_argument("--runs", type=int, default=1, help="measure the agent process this many times (default 1)")
    parser.add_argument(
        "--clients", type=int, default=1, help="applications calling the agent at once while it serves (default 1)"
    )
    parser.add_argument("--skip-venv", action="store_true", help="do not build the agent-only virtualenv")
    parser.add_argument(
        "--plain", action="store_true", help="run the agent without the systemd unit's environment (no -OO)"
    )
    args = parser.parse_args()
    if args.inferences < 100:
        parser.error("--inferences must be at least 100")
    if not 1 <= args.runs <= 50:
        parser.error("--runs must be between 1 and 50")
    if not 1 <= args.clients <= 64:
        parser.error("--clients must be between 1 and 64")
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        root = Path(tmp)
        model = build_dense_model(random_dense_layers([FEATURES, 32, CLASSES], 1))
        (root / "m.tflite").write_bytes(model)
        result: dict[str, object] = {"benchmark": "agent_footprint"}
        result.update(_latency_and_drift_cost(root / "m.tflite", args.inferences))
        result["clients"] = args.clients
        env = {} if args.plain else unit_environment(root / "pycache")
        if env:
            _compile_as_installed(env)
        result["agent_environment"] = "plain" if args.plain else "systemd unit"
        result.update(_repeated(root, model, args.runs, args.clients, env))
        if not args.skip_venv:
            result.update(_venv_mb(root))
    result["targets"] = {"rss_mb": 80, "drift_cost_ratio": 0.5, "venv_mb": 150}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
