"""The whole loop on one machine, decided by the coordinator: train with Flower + Opacus on a simulated fleet,
release, install; then the fleet's sensors drift and this module only watches. `fedfleet serve` raises the drift
alarm, its policy says retrain, the fleet retrains on its fresh (drifted) data within its privacy budget in a
process the coordinator starts, the new model is released and rolled out in gated waves, and drift returns below
the threshold. Every decision lands in the coordinator's database and audit trail with actor `coordinator`; what
this module prints it reads from there.

`fedfleet demo` runs it with defaults that finish in a few minutes; tests run it small, also with the coordinator
killed at the loop's crash points (`crash_points`).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.contract.files import atomic_write_bytes
from server.crashpoints import ENV as CRASH_ENV
from server.datadir import DataDir
from server.fl.client_app import SourceFor
from server.fl.data import DigitsPartition
from server.fl.export import release_model_version
from server.fl.plan import TrainPlan
from server.fl.progress import RoundProgress
from server.fl.registry import Ledger
from server.fl.training import TrainOutcome, run_training
from server.loop.drift_watch import DriftReading, read_fleet_drift
from server.loop.retrain import FINAL
from simulations.processes import CoordinatorProcess, kill_tree
from simulations.rig import Rig
from simulations.scenario import FINAL_PHASES, RolloutWatch, drain_and_count_lost
from simulations.workload import InputStream, SensorFault

__all__ = [
    "ClosedLoopResult",
    "SensedDigits",
    "digits_stream",
    "fleet_sensors",
    "run_closed_loop",
    "verdict",
]

Progress = Callable[[str], None]
POLICY = """# fedfleet demo policy: what may be released, and what fleet-wide drift leads to
[release]
max_epsilon = {max_epsilon}
required_card_fields = ["intended_use", "privacy.epsilon"]

[retrain]
on_drift = "retrain"
metric = "input_max_psi"
threshold = {threshold}
window_seconds = {window}
min_devices = 2
rounds = {rounds}
target_epsilon = 3.0
# lab: six simulated devices, so the drift reference is exact (a private one's noise would drown the fault)
exact_reference = true
# the simulated devices' data as their (drifted) sensors give it; a real fleet trains on its SuperNodes
data_source = "simulations.closed_loop:fleet_sensors"
rollout_spec = "retrain-rollout.toml"
{webhooks}"""
ROLLOUT_SPEC = """# how the coordinator rolls out a retrained release (the release and fleet are the retrain job's)
canary = 2
waves = [0.5, 1.0]
bake_seconds = 3
min_samples = 400

[[gates]]
metric = "input_mean_psi"
op = "<="
threshold = 0.1

[[gates]]
metric = "score_psi"
op = "<="
threshold = 0.25

[[gates]]
metric = "failure_rate"
op = "<="
threshold = 0.1
"""
SENSORS_FILE = "simulation/sensors.json"  # the simulated fleet's sensor fault, for the retraining's data
# Audit actions of the loop, as the demo tells them.
LOOP_ACTIONS = ("drift.alarm", "retrain.", "drift.resolved")


@dataclass(frozen=True)
class SensedDigits:
    """A simulated device's training data as its sensor gives it: its digits share, through the fault if any."""

    partition: int
    num_partitions: int
    alpha: float
    seed: int
    fault: SensorFault | None = None

    @property
    def name(self) -> str:
        return f"digits[{self.partition}/{self.num_partitions}]" + (f" via {self.fault}" if self.fault else "")

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = DigitsPartition(self.partition, self.num_partitions, self.alpha, self.seed).load()
        if self.fault is not None:
            x = self.fault.apply(x, np.random.default_rng((self.seed, self.partition, 7)))
        return x, y


def fleet_sensors(d: DataDir) -> SourceFor:
    """The policy's retrain.data_source for a simulated fleet: each device's digits share through the sensor fault
    the simulation wrote to DATA/simulation/sensors.json (none: clean digits)."""
    path = d.root / SENSORS_FILE
    doc = json.loads(path.read_text()) if path.exists() else None
    fault = SensorFault(str(doc["kind"]), float(doc["strength"])) if doc else None

    def source(partition: int, partitions: int, alpha: float, seed: int) -> SensedDigits:
        return SensedDigits(partition, partitions, alpha, seed, fault)

    return source


def digits_stream(devices: int, alpha: float, seed: int) -> InputStream:
    """Device i infers on digits drawn from its own share (what its camera sees; the workload adds faults)."""
    shares = [DigitsPartition(i, devices, alpha, seed).load()[0] for i in range(devices)]

    def draw(i: int, n: int, rng: np.random.Generator) -> np.ndarray:
        share = shares[i]
        rows: np.ndarray = share[rng.integers(0, len(share), n)]
        return rows

    return draw


@dataclass
class ClosedLoopResult:
    timeline: list[tuple[float, str]] = field(default_factory=list)
    trainings: list[TrainOutcome] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)  # the initial release, then the retrained one
    drift_before: DriftReading | None = None
    alarm: dict[str, Any] | None = None  # the coordinator's drift alarm
    job: dict[str, Any] | None = None  # the retrain job it led to
    drift_after: DriftReading | None = None
    rollout: dict[str, Any] = field(default_factory=dict)
    final_releases: dict[str, int] = field(default_factory=dict)  # release -> devices running it at the end
    max_lifetime_epsilon: float = 0.0
    budget: float = 0.0
    releases_over_time: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    lost_windows: int = -1  # telemetry windows a device sent that the coordinator lacks (-1: not counted)
    coordinator_restarts: int = 0
    started_ms: int = field(default_factory=lambda: int(time.time() * 1000))  # the run's clock: the plots' origin
    fault_seconds: float | None = None  # when the sensors' fault began, on that clock


@dataclass
class ClosedLoopRig(Rig):
    """A rig whose first release comes from federated training on the fleet's own devices."""

    rounds: int = 3
    target_epsilon: float = 3.0
    alpha: float = 0.5
    progress: Progress = print
    result: ClosedLoopResult = field(default_factory=ClosedLoopResult)
    started: float = field(default_factory=time.monotonic)
    crash_points: list[str] = field(default_factory=list)  # the coordinator's, one per start

    def note(self, text: str) -> None:
        self.result.timeline.append((time.monotonic() - self.started, text))
        self.progress(text)

    def publish(self, d: DataDir) -> str:
        """The first model: trained here, before the loop (what comes after is the coordinator's)."""
        plan = TrainPlan(
            rounds=self.rounds,
            clients=self.devices,
            target_epsilon=self.target_epsilon,
            noise_multiplier=None,
            alpha=self.alpha,
            seed=self.seed,
            round_timeout=240.0,  # a demo round takes seconds: a lost client fails it in minutes, not ten
            exact_reference=True,  # six simulated devices: a DP reference's noise would drown the fault (see below)
        )

        def shown(p: RoundProgress) -> None:
            eps = "" if p.epsilon_max is None else f", ε {p.epsilon_max:.2f}"
            self.note(f"  round {p.round}/{p.rounds}: accuracy {p.test_accuracy:.3f}{eps}")

        self.note(
            f"training the first model on {self.devices} devices (Flower + Opacus, target ε {self.target_epsilon})"
        )
        self.note(
            "  lab setting: the drift reference comes from exact counts of these simulated devices (exact_reference; "
            "the model card says it is not private); on a handful of devices a private reference's noise drowns "
            "drift, so a real fleet of this size should keep the default and expect loud drift statistics"
        )
        outcome = run_training(d.root, plan, device_ids=self.device_ids(), on_round=shown)
        self.result.trainings.append(outcome)
        if outcome.status != "completed":
            raise RuntimeError(f"training failed: {outcome.error}")
        report = release_model_version(d, outcome.model_version, actor="demo")
        release = report.release.release.id
        self.result.releases.append(release)
        self.note(
            f"released {release} (parity {report.facts['parity_max_abs_diff']:.1e}, "
            f"held-out accuracy {report.facts['accuracy_tflite']:.3f})"
        )
        return release

    def start_coordinator(self, env: dict[str, str] | None = None) -> CoordinatorProcess:
        """Started with the next of `crash_points`, if any, where it will kill itself (SIGKILL)."""
        point = self.crash_points.pop(0) if self.crash_points else ""
        return super().start_coordinator({**(env or {}), **({CRASH_ENV: point} if point else {})})

    def stop(self) -> None:
        try:
            super().stop()
        finally:  # retrain workers run in sessions of their own, so they outlive a killed coordinator
            for lock in (self.datadir.root / "loop").glob("job-*.lock"):
                pid = lock.read_text().strip()
                if pid.isdigit():
                    kill_tree(int(pid))


class _Watch:
    """Tells what the coordinator decides (its audit trail and retrain jobs) as it happens; restarts a
    coordinator that died at one of its crash points."""

    def __init__(self, rig: ClosedLoopRig) -> None:
        self.rig = rig
        self.seq = 0
        self.job_state = ""

    def poll(self) -> None:
        rig = self.rig
        for e in rig.store_query(
            "SELECT seq, actor, action, subject, detail FROM audit WHERE seq > ? ORDER BY seq", [self.seq]
        ):
            self.seq = e["seq"]
            if e["action"].startswith(LOOP_ACTIONS):
                rig.note(f"coordinator: {e['action']} {e['subject']} — {_said(json.loads(e['detail']))}")
        jobs = rig.store_query("SELECT * FROM retrain_jobs ORDER BY id DESC LIMIT 1")
        if jobs and jobs[0]["state"] != self.job_state:
            self.job_state = jobs[0]["state"]
            rig.note(f"retrain job {jobs[0]['id']}: {self.job_state}")
        coordinator = rig.coordinator
        assert coordinator is not None and coordinator.proc is not None
        if coordinator.proc.poll() is not None:
            point = coordinator.env.get(CRASH_ENV, "")
            if not point:
                raise RuntimeError(f"the coordinator exited:\n{coordinator.log.read_text()[-3000:]}")
            rig.result.coordinator_restarts += 1
            rig.note(f"coordinator killed at crash point {point!r}; restarting it")
            rig.start_coordinator()


def _said(detail: dict[str, Any]) -> str:
    for key in ("summary", "decision", "model_version", "release", "why", "error", "cause"):
        if key in detail:
            return str(detail[key])
    return json.dumps(detail)[:200]


def run_closed_loop(
    root: Path,
    devices: int = 10,
    rounds: int = 3,
    seed: int = 0,
    fault: SensorFault | None = None,
    threshold: float = 0.25,
    window_seconds: float = 3.0,
    progress: Progress = print,
    timeout: float = 240.0,
    after: Callable[[ClosedLoopRig], None] | None = None,
    webhooks: str = "",
    crash_points: Sequence[str] = (),
) -> ClosedLoopResult:
    """`webhooks`: [[alerts.webhooks]] tables for the policy; `crash_points`: the coordinator is started with the
    first and, each time it dies at one, restarted with the next (the loop must still close, once)."""
    fault = fault or SensorFault("contrast", 0.5)
    rig = ClosedLoopRig(
        root,
        devices=devices,
        seed=seed,
        rounds=rounds,
        progress=progress,
        rate=30.0,
        inputs=digits_stream(devices, 0.5, seed),
    )
    d = rig.datadir
    d.root.mkdir(parents=True, exist_ok=True)
    result = rig.result
    rig.crash_points = list(crash_points)
    watch = _Watch(rig)
    try:
        DataDir.init(d.root)
        policy_text = POLICY.format(
            max_epsilon=8.0, threshold=threshold, window=window_seconds, rounds=rounds, webhooks=webhooks
        )
        (d.root / "policy.toml").write_text(policy_text)
        (d.root / "retrain-rollout.toml").write_text(ROLLOUT_SPEC)
        rig.setup()
        first = result.releases[0]
        rig.note(f"fleet of {devices} devices running {first}, inferring on their digits")
        if rig.coordinator is not None and rig.coordinator.endpoints.get("dashboard"):
            rig.note(f"watch it on the dashboard: {rig.coordinator.endpoints['dashboard']}")
            # On the terminal only: the report (summary.md) is for sharing, a token is not.
            rig.progress(f"sign in with the operator token {d.operator_token()}")
        policy = d.policy()
        time.sleep(window_seconds * 2)
        store = d.store()
        try:
            result.drift_before = read_fleet_drift(store, rig.fleet_name, policy)
        finally:
            store.close()
        rig.note(f"drift on {first}: {_fmt(result.drift_before)}")
        assert rig.fleet is not None and rig.fleet.workload is not None
        atomic_write_bytes(d.root / SENSORS_FILE, json.dumps({"kind": fault.kind, "strength": fault.strength}).encode())
        rig.fleet.workload.faults.update(dict.fromkeys(rig.device_ids(), fault))
        result.fault_seconds = time.monotonic() - rig.started
        rig.note(f"every device's sensor now suffers {fault.kind} {fault.strength}; the coordinator decides from here")
        deadline = time.monotonic() + timeout * 3  # alarm, a training run and a rollout
        while True:
            watch.poll()
            jobs = rig.store_query("SELECT * FROM retrain_jobs ORDER BY id")
            if jobs and jobs[0]["state"] in ("rolling_out", *FINAL):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the coordinator did not retrain and roll out within {timeout * 3:.0f} s")
            time.sleep(0.25)
        job = jobs[0]
        alarms = rig.store_query("SELECT * FROM drift_alarms WHERE id = ?", [job["alarm_id"]])
        result.alarm = alarms[0]
        if job["state"] == "failed":
            result.job = job
            return result
        result.releases.append(job["release_id"])
        result.trainings.append(_outcome(rig, job))
        rollout = RolloutWatch(rig, job["rollout_id"], rig.note, result.releases_over_time, rig.started)
        while rollout.poll() not in FINAL_PHASES:
            watch.poll()
            if time.monotonic() > deadline + timeout:
                raise TimeoutError(f"{job['rollout_id']} still running")
            time.sleep(0.25)
        wait_for_job = time.monotonic() + 30
        while rig.store_query("SELECT state FROM retrain_jobs WHERE id = ?", [job["id"]])[0]["state"] not in FINAL:
            watch.poll()
            if time.monotonic() > wait_for_job:
                raise TimeoutError(f"retrain job {job['id']} did not finish after its rollout ended")
            time.sleep(0.25)
        watch.poll()
        result.job = rig.store_query("SELECT * FROM retrain_jobs WHERE id = ?", [job["id"]])[0]
        result.alarm = rig.store_query("SELECT * FROM drift_alarms WHERE id = ?", [job["alarm_id"]])[0]
        result.rollout = rig.status(job["rollout_id"])
        time.sleep(window_seconds * 2)
        store = d.store()
        try:
            result.drift_after = read_fleet_drift(store, rig.fleet_name, policy)
            ledger = Ledger(store, d.config().epsilon_budget)
            result.budget = d.config().epsilon_budget
            result.max_lifetime_epsilon = max((r["lifetime_epsilon"] for r in ledger.rows()), default=0.0)
        finally:
            store.close()
        rig.note(f"drift on {job['release_id']}: {_fmt(result.drift_after)}")
        result.lost_windows = drain_and_count_lost(rig)
        result.final_releases = dict(
            Counter(r["running_release"] for r in rig.store_query("SELECT running_release FROM devices"))
        )
        if after is not None:
            after(rig)
    finally:
        rig.stop()
    return result


def _outcome(rig: Rig, job: dict[str, Any]) -> TrainOutcome:
    """The retraining run as the coordinator recorded it."""
    rounds = rig.store_query("SELECT * FROM fl_rounds WHERE run_id = ? ORDER BY round", [job["run_id"]])
    incidents = rig.store_query("SELECT * FROM fl_incidents WHERE run_id = ?", [job["run_id"]])
    return TrainOutcome(job["run_id"], "completed", job["model_version"], "", rounds, incidents)


def _fmt(reading: DriftReading | None) -> str:
    if reading is None or reading.value is None:
        return "not enough telemetry yet"
    return f"{reading.describe()} over {reading.devices} devices"


def verdict(result: ClosedLoopResult) -> list[str]:
    """What a closed loop must show, from the coordinator's state; empty when it did."""
    failures = []
    if result.alarm is None:
        failures.append("no drift alarm")
    if result.job is None or result.job["state"] != "completed":
        failures.append(f"the retrain job ended {result.job['state'] if result.job else 'never'}")
    if len(result.releases) != 2:
        failures.append("no retrained release")
    elif result.final_releases != {result.releases[1]: sum(result.final_releases.values())}:
        failures.append(f"devices do not all run {result.releases[1]}: {result.final_releases}")
    if result.rollout.get("phase") != "completed":
        failures.append(f"the rollout ended {result.rollout.get('phase')}")
    after = result.drift_after
    if after is None or after.value is None or after.over:
        failures.append(f"drift did not return below the threshold ({after.value if after else None})")
    if result.lost_windows != 0:
        failures.append(f"{result.lost_windows} telemetry windows lost")
    if result.max_lifetime_epsilon > result.budget:
        failures.append(f"a device spent ε {result.max_lifetime_epsilon:.3f}, over its budget {result.budget}")
    return failures
