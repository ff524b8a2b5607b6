"""The whole loop on one machine: train with Flower + Opacus on a simulated fleet, release, install; then the
fleet's sensors drift, the coordinator's drift alarm fires, the policy says retrain, the fleet retrains on its
fresh (drifted) data within its privacy budget, the new model is released and rolled out in gated waves, and
drift returns below the threshold. Every decision lands in the coordinator's database and audit trail.

`fedfleet demo` runs it with defaults that finish in a few minutes; tests run it small.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.drift import DriftReference, WindowCounts, score_window
from edge_agent.telemetry import counts_from_proto
from server.datadir import DataDir
from server.drift_alarm import DriftAlarm, check_fleet_drift, raise_alarm
from server.fl.data import DigitsPartition
from server.fl.export import release_model_version
from server.fl.plan import TrainPlan
from server.fl.registry import Ledger
from server.fl.server_app import RoundProgress
from server.fl.training import TrainOutcome, run_training
from simulations.rig import Rig
from simulations.scenario import FINAL_PHASES, RolloutWatch, drain_and_count_lost
from simulations.workload import InputStream, SensorFault

__all__ = ["ClosedLoopResult", "SensedDigits", "digits_stream", "drift_by_release", "run_closed_loop", "verdict"]

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
"""


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
    drift_before: DriftAlarm | None = None
    alarm: DriftAlarm | None = None
    drift_after: DriftAlarm | None = None
    rollout: dict[str, Any] = field(default_factory=dict)
    final_releases: dict[str, int] = field(default_factory=dict)  # release -> devices running it at the end
    max_lifetime_epsilon: float = 0.0
    budget: float = 0.0
    releases_over_time: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    lost_windows: int = -1  # telemetry windows a device sent that the coordinator lacks (-1: not counted)


@dataclass
class ClosedLoopRig(Rig):
    """A rig whose first release comes from federated training on the fleet's own devices."""

    rounds: int = 3
    target_epsilon: float = 3.0
    alpha: float = 0.5
    progress: Progress = print
    result: ClosedLoopResult = field(default_factory=ClosedLoopResult)
    started: float = field(default_factory=time.monotonic)

    def note(self, text: str) -> None:
        self.result.timeline.append((time.monotonic() - self.started, text))
        self.progress(text)

    def train_and_release(self, d: DataDir, parent: str = "", fault: SensorFault | None = None) -> str:
        plan = TrainPlan(
            rounds=self.rounds,
            clients=self.devices,
            target_epsilon=self.target_epsilon,
            noise_multiplier=None,
            alpha=self.alpha,
            seed=self.seed,
            parent=parent,
            data_label=f"sensors with {fault.kind} {fault.strength}" if fault else "",
            round_timeout=240.0,  # a demo round takes seconds: a lost client fails it in minutes, not ten
        )

        def shown(p: RoundProgress) -> None:
            eps = "" if p.epsilon_max is None else f", ε {p.epsilon_max:.2f}"
            self.note(f"  round {p.round}/{p.rounds}: accuracy {p.test_accuracy:.3f}{eps}")

        def source(partition: int, partitions: int, alpha: float, seed: int) -> SensedDigits:
            return SensedDigits(partition, partitions, alpha, seed, fault)

        self.note(
            f"training {'from ' + parent if parent else 'the first model'} on {self.devices} devices "
            f"(Flower + Opacus, target ε {self.target_epsilon})"
        )
        outcome = run_training(d.root, plan, device_ids=self.device_ids(), on_round=shown, source_for=source)
        self.result.trainings.append(outcome)
        if outcome.status != "completed":
            raise RuntimeError(f"training failed: {outcome.error}")
        report = release_model_version(d, outcome.model_version, actor="closed-loop")
        release = report.release.release.id
        self.result.releases.append(release)
        self.note(
            f"released {release} (parity {report.facts['parity_max_abs_diff']:.1e}, "
            f"held-out accuracy {report.facts['accuracy_tflite']:.3f})"
        )
        return release

    def publish(self, d: DataDir) -> str:
        return self.train_and_release(d)


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
) -> ClosedLoopResult:
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
    try:
        DataDir.init(d.root)
        (d.root / "policy.toml").write_text(POLICY.format(max_epsilon=8.0, threshold=threshold, window=window_seconds))
        rig.setup()
        first = result.releases[0]
        rig.note(f"fleet of {devices} devices running {first}, inferring on their digits")
        if rig.coordinator is not None and rig.coordinator.endpoints.get("dashboard"):
            rig.note(
                f"watch it on the dashboard: {rig.coordinator.endpoints['dashboard']} "
                f"(operator token: {d.operator_token()})"
            )
        policy = d.policy()
        time.sleep(window_seconds * 2)
        store = d.store()
        try:
            result.drift_before = check_fleet_drift(store, rig.fleet_name, policy)
            rig.note(f"drift on {first}: {_fmt(result.drift_before)}")
            assert rig.fleet is not None and rig.fleet.workload is not None
            rig.fleet.workload.faults.update({dev: fault for dev in rig.device_ids()})
            rig.note(f"every device's sensor now suffers {fault.kind} {fault.strength}")
            deadline = time.monotonic() + timeout
            while True:
                alarm = check_fleet_drift(store, rig.fleet_name, policy)
                if alarm is not None and alarm.over:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no drift alarm within {timeout:.0f} s: {_fmt(alarm)}")
                time.sleep(0.5)
            raise_alarm(store, alarm)
            result.alarm = alarm
            rig.note(f"drift alarm: {_fmt(alarm)}; policy retrain.on_drift = {alarm.decision!r}")
        finally:
            store.close()
        if alarm.decision != "retrain":
            return result
        parent = result.trainings[0].model_version
        retrained = rig.train_and_release(d, parent=parent, fault=fault)
        rollout = rig.cli(
            "rollout",
            "start",
            retrained,
            "--fleet",
            rig.fleet_name,
            "--canary",
            "2",
            "--waves",
            "0.5,1.0",
            "--bake",
            "3",
            "--min-samples",
            "400",
            "--gate",
            "input_mean_psi<=0.1",
            "--gate",
            "score_psi<=0.25",
            "--gate",
            "failure_rate<=0.1",
        )
        rollout_id = rollout["id"]
        rig.note(f"{rollout_id}: rolling out {retrained} (canary 2, then 50%, 100%)")
        watch = RolloutWatch(rig, rollout_id, rig.note, result.releases_over_time, rig.started)
        while True:
            phase = watch.poll()
            if phase in FINAL_PHASES:
                break
            if time.monotonic() > deadline + timeout:
                raise TimeoutError(f"{rollout_id} still {phase}")
            time.sleep(0.25)
        result.rollout = rig.status(rollout_id)
        time.sleep(window_seconds * 2)
        store = d.store()
        try:
            result.drift_after = check_fleet_drift(store, rig.fleet_name, policy)
            ledger = Ledger(store, d.config().epsilon_budget)
            result.budget = d.config().epsilon_budget
            result.max_lifetime_epsilon = max((r["lifetime_epsilon"] for r in ledger.rows()), default=0.0)
        finally:
            store.close()
        rig.note(f"drift on {retrained}: {_fmt(result.drift_after)}")
        result.lost_windows = drain_and_count_lost(rig)
        result.final_releases = dict(
            Counter(r["running_release"] for r in rig.store_query("SELECT running_release FROM devices"))
        )
        if after is not None:
            after(rig)
    finally:
        rig.stop()
    return result


def drift_by_release(rig: Rig, bucket_seconds: float = 2.0) -> dict[str, list[tuple[float, float]]]:
    """Largest input PSI of the fleet's windows per release and time bucket, each against its own release's
    reference (seconds since the first window)."""
    references = {
        r["id"]: DriftReference.from_metadata(json.loads(r["custom"])["drift_reference"])
        for r in rig.store_query("SELECT id, custom FROM releases")
        if "drift_reference" in json.loads(r["custom"])
    }
    rows = rig.store_query("SELECT release_id, end_ms, payload FROM telemetry ORDER BY end_ms")
    if not rows:
        return {}
    t0 = int(rows[0]["end_ms"])
    buckets: dict[tuple[str, int], WindowCounts] = {}
    for r in rows:
        if r["release_id"] not in references:
            continue
        key = (r["release_id"], int((r["end_ms"] - t0) / 1000 / bucket_seconds))
        counts = counts_from_proto(pb.TelemetryWindow.FromString(r["payload"]))
        buckets[key] = counts if key not in buckets else buckets[key].merge(counts)
    series: dict[str, list[tuple[float, float]]] = {}
    for (release, b), counts in sorted(buckets.items()):
        score = score_window(counts, references[release], min_samples=50)
        if score is not None:
            series.setdefault(release, []).append((b * bucket_seconds, score.max_psi))
    return series


def _fmt(alarm: DriftAlarm | None) -> str:
    if alarm is None or alarm.value is None:
        return "not enough telemetry yet"
    verdict = "over" if alarm.over else "within"
    return f"{alarm.metric} {alarm.value:.3f} ({verdict} {alarm.threshold}) over {alarm.devices} devices"


def verdict(result: ClosedLoopResult) -> list[str]:
    """What a closed loop must show, from the coordinator's state; empty when it did."""
    failures = []
    if result.alarm is None or not result.alarm.over:
        failures.append("no drift alarm")
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
