"""The coordinator's side of noised telemetry windows (issue 19): each window's ε goes into the device's monitoring
ledger (never the training privacy ledger), once; a device whose budget is spent is known as such; absurd noise
figures are refused; and the gates' minimum samples count noised windows for what they are worth."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.config import load_config
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.drift import DriftReference, WindowCounts, WindowNoise, effective_samples
from edge_agent.contract.windows import ClosedWindow, noised, window_to_proto
from server.datadir import DataDir
from server.ingest.events import EventRejected
from server.ingest.telemetry import ingest_window, ingest_windows, parse_window, pool
from server.loop.drift_watch import read_fleet_drift
from server.policy import Policy
from server.rollout.engine import Verdict, WaveObservation, evaluate_gates
from server.rollout.metrics import telemetry_values
from server.rollout.spec import Gate, RolloutSpec
from server.store import Store
from server.store.monitoring import MonitoringLedger
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers
from tests.support import AgentProcess, CoordinatorProcess, Mosquitto, enroll_agent, wait_for

FEATURES, CLASSES = 64, 10
RELEASE = "digits@1.0.0"


def reference() -> DriftReference:
    return DriftReference.from_samples(np.random.default_rng(0).random((4000, FEATURES)), CLASSES)


def counts(ref: DriftReference, n: int, seed: int) -> WindowCounts:
    rng = np.random.default_rng(seed)
    c = WindowCounts.empty(ref)
    logits = rng.normal(0, 1, (n, CLASSES))
    c.add(ref, rng.random((n, FEATURES)), np.exp(logits) / np.exp(logits).sum(1, keepdims=True), rng.exponential(2, n))
    return c


def message(c: WindowCounts, device: str, seq: int) -> pb.TelemetryWindow:
    return parse_window(
        window_to_proto(ClosedWindow(RELEASE, seq * 1000, seq * 1000 + 900, c), device, seq).SerializeToString()
    )


def noisy(ref: DriftReference, n: int, seed: int, epsilon: float, spent: float, budget: float) -> WindowCounts:
    exhausted = spent + epsilon > budget
    return noised(counts(ref, n, seed), epsilon, np.random.default_rng(seed), spent, budget, exhausted)  # repeatable


@pytest.fixture
def store(datadir: DataDir) -> Store:
    s = datadir.store()
    for device in ("pi-1", "pi-2", "pi-3"):
        s.register_device(device, "lab", {}, {}, "t")
    model = build_dense_model(random_dense_layers([FEATURES, 16, CLASSES], 1))
    publish_release(
        datadir.repository(), s, model, "digits", "1.0.0", extra={"drift_reference": reference().to_metadata()}
    )
    return s


def test_each_noised_windows_epsilon_goes_to_the_devices_monitoring_ledger_once(store: Store) -> None:
    # Prepare: pi-1 sends three noised windows at ε 0.5, pi-2 one exact and one noised, pi-3 only exact ones.
    ref = reference()
    batch = [(message(noisy(ref, 200, s, 0.5, 0.5 * s, 10.0), "pi-1", s), "pi-1") for s in (1, 2, 3)]
    batch += [
        (message(counts(ref, 200, 4), "pi-2", 1), "pi-2"),
        (message(noisy(ref, 200, 5, 2.0, 2.0, 10.0), "pi-2", 2), "pi-2"),
    ]
    batch += [(message(counts(ref, 200, 6), "pi-3", 1), "pi-3")]
    # Execute: one batch, then pi-1's first window again (a resend after a lost ack).
    results = ingest_windows(store, batch, "grpc")
    again = ingest_window(store, batch[0][0], "pi-1", "mqtt")
    # Assert
    assert not any(isinstance(r, EventRejected) for r in results) and not again.stored
    spends = {s.device_id: s for s in MonitoringLedger(store).spends()}
    assert set(spends) == {"pi-1", "pi-2"}  # pi-3 spent nothing
    assert (spends["pi-1"].windows, spends["pi-1"].epsilon, spends["pi-1"].device_spent) == (3, 1.5, 1.5)
    assert (spends["pi-2"].windows, spends["pi-2"].epsilon, spends["pi-2"].exhausted) == (1, 2.0, False)
    assert spends["pi-1"].to_json()["remaining"] == 8.5
    # Not the training ledger: that is ε of training runs and drift-reference queries only.
    for table in ("privacy_spend", "privacy_query_spend"):
        assert store.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0
    # The ledger is append-only, like the privacy ledger.
    with pytest.raises(sqlite3.DatabaseError, match="never deleted"):
        store.db.execute("DELETE FROM monitoring_spend")
    with pytest.raises(sqlite3.DatabaseError, match="never changed"):
        store.db.execute("UPDATE monitoring_spend SET epsilon = 0")


def test_the_coordinator_knows_a_device_stopped_because_its_budget_is_spent(store: Store) -> None:
    # Prepare: a budget of 2 at ε 1: the second window is the last; then (a restart with a lower budget) a marker.
    ref = reference()
    last = noisy(ref, 100, 2, 1.0, 2.0, 2.0)
    marker = WindowCounts.empty(ref)
    marker.noise = WindowNoise(0.0, 0.0, 2.0, 2.0, exhausted=True)
    # Execute
    for seq, c in enumerate([noisy(ref, 100, 1, 1.0, 1.0, 2.0), last, marker], start=1):
        ingest_window(store, message(c, "pi-1", seq), "pi-1", "mqtt")
    # Assert: two windows' ε, the device's budget spent, and the marker stored as a window that pools to nothing.
    (spend,) = MonitoringLedger(store).spends("pi-1")
    assert (spend.windows, spend.epsilon, spend.exhausted, spend.last_sequence) == (2, 2.0, True, 3)
    assert spend.to_json()["remaining"] == 0.0
    assert pool(store, RELEASE, ["pi-1"]).windows == 3


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"dp_epsilon": -1.0}, "finite and non-negative"),
        ({"dp_noise_scale": float("nan")}, "finite and non-negative"),
        ({"dp_noise_scale": 0.0}, "both its ε and its noise scale"),
        ({"dp_epsilon": 0.0, "dp_noise_scale": 0.0}, "empty budget-spent marker"),
        ({"monitoring_budget_epsilon": float("inf")}, "finite and non-negative"),
    ],
)
def test_absurd_noise_figures_are_refused_and_charge_nothing(
    store: Store, change: dict[str, float], reason: str
) -> None:
    m = window_to_proto(ClosedWindow(RELEASE, 0, 1, noisy(reference(), 100, 1, 1.0, 1.0, 5.0)), "pi-1", 1)
    for field, value in change.items():
        setattr(m, field, value)
    with pytest.raises(EventRejected, match=reason):
        ingest_window(store, parse_window(m.SerializeToString()), "pi-1", "mqtt")
    assert MonitoringLedger(store).spends() == []
    assert store.db.execute("SELECT count(*) FROM telemetry").fetchone()[0] == 0


def test_pooled_noise_averages_out_instead_of_keeping_the_clamping_bias(store: Store) -> None:
    # Prepare: 30 noised windows of inputs that are never NaN: every feature's true NaN count is 0.
    ref = reference()
    messages = [message(noisy(ref, 100, seq, 5.0, 5.0 * seq, 1000.0), "pi-1", seq) for seq in range(1, 31)]
    # Execute
    for m in messages:
        ingest_window(store, m, "pi-1", "grpc")
    pooled = pool(store, RELEASE, ["pi-1"]).counts
    # Assert: each window's clamped NaN counts add up to about b/2 per count and window (30 * 64 * 13.4 ≈ 25700);
    # the signed ones pooled, then clamped once, to about 0.4 standard deviations per count (64 * 83 ≈ 5300).
    clamped_sum = sum(sum(m.feature_nan) for m in messages)
    assert clamped_sum > 20_000
    assert int(pooled.nan_counts.sum()) < 12_000
    assert pooled.nan_counts.min() >= 0 and pooled.inferences == int(pooled.class_counts.sum())


def test_unclamped_counts_that_do_not_fit_the_window_are_refused(store: Store) -> None:
    m = window_to_proto(ClosedWindow(RELEASE, 0, 1, noisy(reference(), 100, 1, 1.0, 1.0, 5.0)), "pi-1", 1)
    del m.dp_unclamped.feature_bins[-1]
    with pytest.raises(EventRejected, match="layout"):
        ingest_window(store, parse_window(m.SerializeToString()), "pi-1", "mqtt")
    assert MonitoringLedger(store).spends() == []


def test_effective_samples_is_the_count_without_noise_and_fewer_with_it() -> None:
    ref = reference()
    exact = counts(ref, 1000, 1)
    assert effective_samples(exact) == 1000 and effective_samples(exact, 640) == 640
    one = noised(exact, 5.0, np.random.default_rng())
    assert one.noise is not None
    n, variance, k = one.inferences, one.noise.variance, 10
    assert effective_samples(one) == int(n / (1 + variance * k * k / ((k - 1) * n)))
    pooled = one.merge(noised(exact, 5.0, np.random.default_rng()))
    assert pooled.noise is not None and pooled.noise.variance == pytest.approx(2 * variance)
    assert pooled.noise.epsilon == 10.0
    assert effective_samples(one) < effective_samples(pooled) < pooled.inferences


def _windows_until_judged(store: Store, device: str, epsilon: float | None) -> tuple[int, str]:
    """Windows of 1000 inferences `device` must send before an input-drift gate with min_samples 500 judges, and
    the gate's last note while it waited."""
    ref = reference()
    spec = RolloutSpec(RELEASE, min_samples=500, min_devices=1, gates=(Gate("input_max_psi", "<=", 0.25),))
    control = WindowCounts.empty(ref)
    note = ""
    for seq in range(1, 40):
        c = counts(ref, 1000, seq) if epsilon is None else noisy(ref, 1000, seq, epsilon, epsilon * seq, 1000.0)
        ingest_window(store, message(c, device, seq), device, "grpc")
        wave = pool(store, RELEASE, [device], min_samples=1)
        values = telemetry_values(wave.counts, wave.score, control)
        # as the rollout driver observes a wave: effective samples, and the inferences behind them for the note
        samples = effective_samples(wave.counts)
        obs = WaveObservation(1, 1, 0, 0, samples, wave.devices, 0, values, inferences=wave.counts.inferences)
        (gate,) = evaluate_gates(spec, obs)
        if gate.verdict is not Verdict.INSUFFICIENT:
            assert gate.verdict is Verdict.PASS  # no drift: judged, and judged right
            # Rates: no failed inference, none checked against a schema (the release has none): a noised
            # inputs_checked is noise, so its rate is not made up; the error rate is near its true 0.
            assert values["invalid_input_rate"] is None or epsilon is None
            assert values["error_rate"] is not None and values["error_rate"] < 0.05
            return seq, note
        note = gate.note
    raise AssertionError("never judged")


def test_a_gate_with_noised_windows_needs_more_inferences_than_without(store: Store) -> None:
    exact, _ = _windows_until_judged(store, "pi-1", None)
    noised_windows, note = _windows_until_judged(store, "pi-2", 5.0)
    assert exact == 1  # 1000 exact inferences are 1000 samples
    assert noised_windows > 3 * exact  # at ε 5 a window of 1000 inferences is worth about 60
    assert "noised windows" in note and "inferences worth" in note


def test_the_drift_watch_needs_the_same_evidence_from_noised_windows(store: Store) -> None:
    ref = reference()
    policy = Policy(retrain_min_devices=1, retrain_window_seconds=10**9)  # 30 samples per bin: 330 here
    store.set_status("pi-1", True, RELEASE, "", 1, "", "")
    ingest_window(store, message(noisy(ref, 2000, 1, 5.0, 5.0, 100.0), "pi-1", 1), "pi-1", "grpc")
    reading = read_fleet_drift(store, "lab", policy, now=10**7)
    assert reading is not None and reading.value is None  # 2000 noised inferences are not yet 330 samples
    assert reading.samples < reading.needed_samples < 2000
    store.set_status("pi-3", True, RELEASE, "", 1, "", "")
    ingest_window(store, message(counts(ref, 2000, 2), "pi-3", 1), "pi-3", "grpc")
    store.set_status("pi-1", False, "", "", 0, "", "")
    exact = read_fleet_drift(store, "lab", policy, now=10**7)
    assert exact is not None and exact.value is not None and exact.samples == 2000
    assert pool(store, RELEASE, ["pi-3"]).to_json()["effective_samples"] == 2000
    noised = pool(store, RELEASE, ["pi-1"], min_samples=1).to_json()
    assert noised["noised"] and noised["effective_samples"] < noised["inferences"]


@pytest.mark.slow
@pytest.mark.broker
def test_a_real_agent_spends_its_budget_over_mqtt_and_stops_across_a_restart(
    datadir: DataDir, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """End to end: an agent process with [telemetry] noise, a coordinator process, a real broker. The coordinator's
    monitoring ledger fills to the device's budget and says it is spent; a restarted agent sends nothing more."""
    # Prepare: a release, a coordinator, and a device whose budget affords three windows of half a second each.
    s = datadir.store()
    model = build_dense_model(random_dense_layers([FEATURES, 16, CLASSES], 1))
    release = publish_release(
        datadir.repository(), s, model, "digits", "1.0.0", extra={"drift_reference": reference().to_metadata()}
    ).release
    s.close()
    coordinator = CoordinatorProcess(datadir, mosquitto.url).start()
    agent = enroll_agent(datadir, tmp_path, "pi-dp", coordinator=coordinator, extra={"telemetry_every_seconds": 0.5})
    agent.config_path.write_text(
        agent.config_path.read_text() + "\n[telemetry]\ndp_epsilon_per_window = 1.0\nmonitoring_budget_epsilon = 3.0\n"
    )
    agent = AgentProcess(agent.config_path, load_config(agent.config_path))
    try:
        agent.start()
        store = datadir.store()
        wait_for(lambda: store.is_device("pi-dp"), 30, what="registration")
        datadir.director().assign(store, ["pi-dp"], release)
        # Execute: windows close on time, inferences or not; wait for the ledger to say the budget is spent.
        ledger = MonitoringLedger(store)
        wait_for(lambda: any(s.exhausted for s in ledger.spends("pi-dp")), 60, what="the budget spent")
        agent.kill()
        wait_for(lambda: not store.device("pi-dp")["online"], 30, what="the killed agent's last will")
        agent.start()  # a restart: the spend is the device's, kept in its state directory
        wait_for(lambda: store.device("pi-dp")["online"], 30, what="the restarted agent online")
        stored = store.db.execute("SELECT count(*) FROM telemetry WHERE device_id = 'pi-dp'").fetchone()[0]
        time.sleep(2.0)  # four windows' time: a device over budget sends none
        # Assert
        (spend,) = ledger.spends("pi-dp")
        assert (spend.windows, spend.epsilon, spend.device_spent, spend.exhausted) == (3, 3.0, 3.0, True)
        assert store.db.execute("SELECT count(*) FROM telemetry WHERE device_id = 'pi-dp'").fetchone()[0] == stored
        assert stored == 3
        on_device = json.loads((agent.config.state_dir / "monitoring.json").read_text())
        assert on_device["spent_epsilon"] == 3.0 and on_device["windows"] == 3
        for table in ("privacy_spend", "privacy_query_spend"):
            assert store.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0
        store.close()
    finally:
        agent.kill()
        coordinator.kill()
