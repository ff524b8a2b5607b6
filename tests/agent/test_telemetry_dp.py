"""Noised telemetry windows on the device (issue 19): Laplace noise at the scale the window's sensitivity asks, the
exact path untouched, a monitoring budget the device never exceeds, that survives a restart, and that says when it
is spent; bad [telemetry] settings refused at load."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent import Agent
from edge_agent.config import DEFAULT_MONITORING_BUDGET, load_config
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.drift import DriftReference, WindowCounts, score_window
from edge_agent.contract.windows import ClosedWindow, counts_from_proto, noised, window_sensitivity, window_to_proto
from edge_agent.errors import ConfigError
from edge_agent.outbox import Outbox
from edge_agent.state import MonitoringBudget
from edge_agent.telemetry import TelemetryRecorder, WindowPrivacy
from server.datadir import DataDir
from server.trust.enrollment import write_bundle

FEATURES, CLASSES = 64, 10
_NEW_FIELDS = {"dp_epsilon", "dp_noise_scale", "monitoring_spent_epsilon", "monitoring_budget_epsilon"}


def reference() -> DriftReference:
    return DriftReference.from_samples(np.random.default_rng(0).random((4000, FEATURES)), CLASSES)


def batch(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1, (n, CLASSES))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return rng.random((n, FEATURES)).astype(np.float32), probs.astype(np.float32), rng.exponential(2.0, n)


def exact_counts(ref: DriftReference, n: int, seed: int = 1) -> WindowCounts:
    counts = WindowCounts.empty(ref)
    counts.add(ref, *batch(n, seed))
    return counts


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_noise_has_the_scale_one_inference_across_the_whole_window_asks() -> None:
    # Prepare: counts large enough that clamping at zero never bites, so noised - exact is the noise itself.
    ref = reference()
    exact = exact_counts(ref, 6000)
    epsilon = 10.0
    b = window_sensitivity(FEATURES) / epsilon
    assert window_sensitivity(FEATURES) == 2 * FEATURES + 6
    rng = np.random.default_rng(20261206)  # seeded: 150 draws of one entropy scalar are few for its 25 % bound
    # Execute
    draws = [noised(exact, epsilon, rng, spent=epsilon, budget=100.0) for _ in range(150)]
    # Assert: per count cell, Laplace(b) has E|X| = b and variance 2b² (rounding adds at most 1/12 + a little).
    feature_noise = np.stack([d.feature_counts - exact.feature_counts for d in draws]).astype(np.float64)
    assert abs(feature_noise.mean()) < 0.05 * b
    assert np.abs(feature_noise).mean() == pytest.approx(b, rel=0.05)
    assert feature_noise.var() == pytest.approx(2 * b * b, rel=0.1)
    class_noise = np.concatenate([d.class_counts - exact.class_counts for d in draws]).astype(np.float64)
    assert np.abs(class_noise).mean() == pytest.approx(b, rel=0.2)
    entropy_noise = np.array([d.entropy_sum - exact.entropy_sum for d in draws])
    assert np.abs(entropy_noise).mean() == pytest.approx(b * CLASSES / math.e, rel=0.25)
    # The window says what it spent and at which scale, and stays a window the coordinator accepts.
    first = draws[0]
    assert first.noise is not None and first.noise.epsilon == epsilon and first.noise.scale == pytest.approx(b)
    msg = window_to_proto(ClosedWindow("digits@1.0.0", 0, 1, first), "pi-1", 1)
    assert (msg.dp_epsilon, msg.dp_noise_scale, msg.monitoring_spent_epsilon) == (epsilon, pytest.approx(b), epsilon)
    back = counts_from_proto(pb.TelemetryWindow.FromString(msg.SerializeToString()))
    assert back.inferences == int(first.class_counts.sum()) and back.noise == first.noise
    assert first.inferences != exact.inferences or first.errors != exact.errors  # noised, not copied


def test_the_noise_comes_from_the_os_not_from_anything_replayable(tmp_path: Path) -> None:
    ref = reference()
    exact = exact_counts(ref, 500)
    a = WindowPrivacy(1.0, MonitoringBudget(tmp_path / "a.json", 10.0))
    b = WindowPrivacy(1.0, MonitoringBudget(tmp_path / "b.json", 10.0))
    one, two = a.release(exact, ref), b.release(exact, ref)
    assert one is not None and two is not None
    assert not np.array_equal(one.feature_counts, two.feature_counts)  # same data, same ε: different noise


def test_without_dp_windows_are_what_they_always_were() -> None:
    # Prepare: a recorder with no [telemetry] settings, and the same inferences counted directly.
    ref = reference()
    closed: list[ClosedWindow] = []
    clock = Clock()
    recorder = TelemetryRecorder(closed.append, every_inferences=300, every_seconds=60, clock=clock)
    recorder.switch("digits@1.0.0", ref)
    x, p, latency = batch(300, 3)
    # Execute: the inference count closes the window, as before.
    for i in range(300):
        recorder.record_one("digits@1.0.0", x[i], p[i], float(latency[i]))
    # Assert: exact counts, no noise field on the wire, and the score of the same counts to the last digit.
    assert len(closed) == 1
    counts = closed[0].counts
    direct = WindowCounts.empty(ref)
    direct.add(ref, x, p, latency)
    assert counts.noise is None and np.array_equal(counts.feature_counts, direct.feature_counts)
    assert counts.entropy_sum == direct.entropy_sum and counts.inferences == 300
    msg = window_to_proto(closed[0], "pi-1", 1)
    assert not {f.name for f, _ in msg.ListFields()} & (_NEW_FIELDS | {"monitoring_budget_exhausted"})
    assert max(f.number for f, _ in msg.ListFields()) <= 21
    back = counts_from_proto(pb.TelemetryWindow.FromString(msg.SerializeToString()))
    s1, s2 = score_window(back, ref, min_samples=1), score_window(direct, ref, min_samples=1)
    assert s1 is not None and s2 is not None
    assert s1.max_psi == s2.max_psi and np.array_equal(s1.feature_kl, s2.feature_kl) and s1.samples == 300


def test_noised_windows_close_on_time_only_and_are_sent_even_empty(tmp_path: Path) -> None:
    ref = reference()
    closed: list[ClosedWindow] = []
    clock = Clock()
    privacy = WindowPrivacy(1.0, MonitoringBudget(tmp_path / "monitoring.json", 10.0))
    recorder = TelemetryRecorder(closed.append, every_inferences=50, every_seconds=60, clock=clock, privacy=privacy)
    recorder.switch("digits@1.0.0", ref)
    x, p, latency = batch(200, 4)
    for i in range(200):  # four times every_inferences: the count does not close a noised window
        recorder.record_one("digits@1.0.0", x[i], p[i], float(latency[i]))
    assert closed == []
    clock.now += 60
    recorder.tick()
    clock.now += 60
    recorder.tick()  # nothing inferred in this one: sent all the same, so its existence tells nothing
    assert len(closed) == 2 and all(w.counts.noise is not None for w in closed)
    assert [w.counts.noise.spent_epsilon for w in closed if w.counts.noise] == [1.0, 2.0]


def test_the_device_stops_at_its_budget_and_says_so(tmp_path: Path) -> None:
    # Prepare: a budget of 2.5 affords two windows of ε 1.
    ref = reference()
    closed: list[ClosedWindow] = []
    clock = Clock()
    budget = MonitoringBudget(tmp_path / "monitoring.json", 2.5)
    recorder = TelemetryRecorder(closed.append, every_seconds=60, clock=clock, privacy=WindowPrivacy(1.0, budget))
    recorder.switch("digits@1.0.0", ref)
    # Execute: five windows' time, with inferences in each.
    for k in range(5):
        x, p, latency = batch(100, 10 + k)
        recorder.record("digits@1.0.0", x, p, latency)
        clock.now += 60
        recorder.tick()
    # Assert: two windows, the second saying it is the last; the spend never past the budget.
    noise = [w.counts.noise for w in closed]
    assert [(n.epsilon, n.spent_epsilon, n.exhausted) for n in noise if n] == [(1.0, 1.0, False), (1.0, 2.0, True)]
    assert budget.spent == 2.0 and budget.windows == 2
    doc = json.loads((tmp_path / "monitoring.json").read_text())
    assert doc["spent_epsilon"] == 2.0 and doc["exhausted_said"] is True
    msg = window_to_proto(closed[-1], "pi-1", 2)
    assert msg.monitoring_budget_exhausted and msg.monitoring_budget_epsilon == 2.5


def test_a_budget_of_decimal_epsilons_affords_budget_over_epsilon_windows(tmp_path: Path) -> None:
    """ε 0.1 three times is a budget of 0.3, as written (as binary floats three times 0.1 exceeds 0.3)."""
    budget = MonitoringBudget(tmp_path / "monitoring.json", 0.3)
    charges = [budget.charge(0.1) for _ in range(4)]
    assert [c is not None for c in charges] == [True, True, True, False]
    assert charges[2] is not None and charges[2].exhausted and budget.windows == 3
    assert not budget.affords(0.1) and budget.remaining() == 0.0


def _bundle(tmp_path: Path, telemetry: str) -> Path:
    d, _ = DataDir.init(tmp_path / "data")
    write_bundle(d, "pi-dp", tmp_path / "bundle", "lab", grpc="127.0.0.1:1", mqtt="mqtt://127.0.0.1:1")
    config = tmp_path / "bundle" / "agent.toml"
    config.write_text(config.read_text() + telemetry)
    return config


def _agent_windows(agent: Agent, ref: DriftReference, closes: int) -> None:
    """Close `closes` windows of the agent's recorder (as its window timer does), each with inferences."""
    recorder = agent.recorder
    recorder.switch("digits@1.0.0", ref)
    for k in range(closes):
        x, p, latency = batch(50, 20 + k)
        recorder.record("digits@1.0.0", x, p, latency)
        recorder.close()


def test_the_spend_survives_an_agent_restart_and_a_lowered_budget_is_said_once(tmp_path: Path) -> None:
    # Prepare: a real agent (its state directory, its outbox) with noise at ε 1 on a budget of 3.
    config_path = _bundle(tmp_path, "\n[telemetry]\ndp_epsilon_per_window = 1.0\nmonitoring_budget_epsilon = 3\n")
    ref = reference()
    agent = Agent(load_config(config_path))
    _agent_windows(agent, ref, 2)
    agent.outbox.close()
    # Execute: the agent restarts (a new process would read the same state directory) and keeps going.
    again = Agent(load_config(config_path))
    _agent_windows(again, ref, 3)
    # Assert: one more window only, the budget's last, and the outbox holds exactly what was sent.
    sent = [pb.TelemetryWindow.FromString(p) for _, p in again.outbox.pending()]
    assert [(m.monitoring_spent_epsilon, m.monitoring_budget_exhausted) for m in sent] == [
        (1.0, False),
        (2.0, False),
        (3.0, True),
    ]
    again.outbox.close()
    # A restart with the budget lowered below the spend: the device sends one empty window that says so, then none.
    config_path.write_text(
        config_path.read_text().replace("monitoring_budget_epsilon = 3", "monitoring_budget_epsilon = 2")
    )
    lowered = Agent(load_config(config_path))
    before = len(lowered.outbox)
    _agent_windows(lowered, ref, 1)  # exhausted was already said under the old budget: nothing
    assert len(lowered.outbox) == before
    state = json.loads((load_config(config_path).state_dir / "monitoring.json").read_text())
    assert state["spent_epsilon"] == 3.0 and state["windows"] == 3
    lowered.outbox.close()


def test_a_device_that_finds_its_budget_spent_sends_one_marker(tmp_path: Path) -> None:
    ref = reference()
    path = tmp_path / "monitoring.json"
    MonitoringBudget(path, 1.0).charge(1.0)  # spent 1 of 1, said with that window
    raised = MonitoringBudget(path, 1.5)  # raised a little: 0.5 left, still less than a window
    closed: list[ClosedWindow] = []
    clock = Clock()
    recorder = TelemetryRecorder(closed.append, every_seconds=60, clock=clock, privacy=WindowPrivacy(1.0, raised))
    recorder.switch("digits@1.0.0", ref)
    for _ in range(3):
        recorder.record("digits@1.0.0", *batch(40, 5))
        clock.now += 60
        recorder.tick()
    assert len(closed) == 0  # already said under the old budget, and the raise affords no window
    (tmp_path / "fresh").mkdir()
    lowered_path = tmp_path / "fresh" / "monitoring.json"
    MonitoringBudget(lowered_path, 5.0).charge(1.0)  # 1 of 5 spent, nothing said
    recorder2 = TelemetryRecorder(
        closed.append, every_seconds=60, clock=clock, privacy=WindowPrivacy(1.0, MonitoringBudget(lowered_path, 1.0))
    )
    recorder2.switch("digits@1.0.0", ref)
    for _ in range(3):
        recorder2.record("digits@1.0.0", *batch(40, 6))
        clock.now += 60
        recorder2.tick()
    assert len(closed) == 1
    marker = closed[0].counts
    assert marker.noise is not None and marker.noise.exhausted and marker.noise.epsilon == 0
    assert marker.inferences == 0 and not marker.feature_counts.any()  # nothing of the inferences leaves
    msg = pb.TelemetryWindow.FromString(window_to_proto(closed[0], "pi-1", 1).SerializeToString())
    assert counts_from_proto(msg).noise == marker.noise


@pytest.mark.parametrize(
    ("telemetry", "message"),
    [
        ("dp_epsilon_per_window = 0", "dp_epsilon_per_window must be a positive number"),
        ("dp_epsilon_per_window = -1.0", "dp_epsilon_per_window must be a positive number"),
        ('dp_epsilon_per_window = "1"', "dp_epsilon_per_window must be a positive number"),
        ("dp_epsilon_per_window = true", "dp_epsilon_per_window must be a positive number"),
        ("dp_epsilon_per_window = nan", "dp_epsilon_per_window must be a positive number"),
        ("dp_epsilon_per_window = inf", "dp_epsilon_per_window must be a positive number"),
        ("monitoring_budget_epsilon = 0", "monitoring_budget_epsilon must be a positive number"),
        ("dp_epsilon_per_window = 2.0\nmonitoring_budget_epsilon = 1.0", "no window could ever be sent"),
        ("dp_epsilon = 1.0", "[telemetry] is a table with two settings"),
    ],
)
def test_bad_telemetry_settings_are_refused_at_load(tmp_path: Path, telemetry: str, message: str) -> None:
    config_path = _bundle(tmp_path, f"\n[telemetry]\n{telemetry}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(config_path)
    assert message in str(refused.value)


def test_defaults_leave_telemetry_exact_and_a_bad_setting_stops_the_agent_before_it_writes(tmp_path: Path) -> None:
    good = load_config(_bundle(tmp_path / "good", ""))
    assert good.dp_epsilon_per_window is None and good.monitoring_budget_epsilon == DEFAULT_MONITORING_BUDGET
    config_path = _bundle(tmp_path / "bad", "\n[telemetry]\ndp_epsilon_per_window = -2\n")
    state_dir = config_path.parent / "state"
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "[telemetry] dp_epsilon_per_window must be a positive number" in done.stderr
    assert not state_dir.exists()  # nothing written: no state, no budget file


def test_a_full_outbox_summarizes_noised_windows_keeping_their_epsilon_and_noise(tmp_path: Path) -> None:
    # Prepare: four noised windows into an outbox that holds two.
    ref = reference()
    box = Outbox(tmp_path / "outbox.db", "pi-1", cap=2)
    windows = [noised(exact_counts(ref, 100, k), 1.0, np.random.default_rng(), float(k), 10.0) for k in (1, 2, 3, 4)]
    # Execute
    for k, c in enumerate(windows, start=1):
        box.append(ClosedWindow("digits@1.0.0", k * 1000, k * 1000 + 900, c))
    # Assert: a summary spent its windows' ε, carries their summed noise variance and their signed counts' sum.
    msgs = [pb.TelemetryWindow.FromString(p) for _, p in box.pending()]
    assert sum(m.dp_epsilon for m in msgs) == 4.0 and len(msgs) == 2
    summary = max(msgs, key=lambda m: m.sequence - m.first_sequence)
    spanned = windows[summary.first_sequence - 1 : summary.sequence]
    b = window_sensitivity(FEATURES) / 1.0
    assert summary.dp_noise_scale == pytest.approx(b * math.sqrt(len(spanned)))
    assert list(summary.dp_unclamped.class_counts) == sum(w.class_counts for w in spanned).tolist()
    assert summary.monitoring_spent_epsilon == max(w.noise.spent_epsilon for w in spanned if w.noise)
    box.close()
