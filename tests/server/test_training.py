"""Federated training for real: Flower's simulation engine (Ray), Opacus DP-SGD on every client, the privacy
ledger in SQLite, the registry, and the release of a trained version that a real agent installs and runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from edge_agent.contract.drift import DriftReference
from edge_agent.runtime import load_model
from server.datadir import DataDir
from server.fl import training
from server.fl.data import DigitsPartition, digits_split, held_out
from server.fl.export import PARITY_TOLERANCE, export_tflite, release_model_version
from server.fl.plan import PlanError, TrainPlan
from server.fl.privacy import BudgetExceeded, DeviceBudget, epsilon_of, steps_per_round
from server.fl.registry import Ledger, Registry, TrainingRuns
from server.fl.training import ENGINE_STOPPED, TrainOutcome, run_training
from simulations.processes import run_bounded
from tests.support import CoordinatorProcess, enroll_agent, wait_for

# Seeded noise: the repeatability test trains the same plan again and compares the weights.
# Longer local training than the defaults (tuned for 20 rounds at a target ε): three rounds that learn.
PLAN = TrainPlan(
    rounds=3, clients=4, noise_multiplier=1.5, seed=7, seeded_noise=True, local_epochs=5, batch_size=32, lr=0.1
)


def cli(d: DataDir, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    # Below pytest's 300 s; an overrun kills the command with whatever it started (Ray's processes).
    out = run_bounded([sys.executable, "-m", "server.cli", *args, "--data-dir", str(d.root)], timeout=240)
    assert (out.returncode == 0) == ok, out.stdout + out.stderr
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[DataDir, TrainOutcome]:
    d, _ = DataDir.init(tmp_path_factory.mktemp("fl") / "data")
    progress: list[int] = []
    outcome = run_training(d.root, PLAN, on_round=lambda p: progress.append(p.round))
    assert outcome.status == "completed", outcome.error
    assert progress == [0, 1, 2, 3]  # the caller sees every round as it ends
    return d, outcome


# ----- pure parts -----


def test_split_is_non_iid_seeded_and_disjoint() -> None:
    parts = digits_split(10, 0.5, 0)
    assert parts == digits_split(10, 0.5, 0)
    rows = [r for p in parts for r in p]
    assert len(rows) == len(set(rows))  # no example on two devices
    x_test, _ = held_out(0)
    assert len(rows) + len(x_test) == 1797  # every digit is somewhere, the test split apart
    labels = [np.bincount(DigitsPartition(i, 10, 0.5, 0).load()[1], minlength=10) / len(parts[i]) for i in range(10)]
    assert max(float(p.max()) for p in labels) > 0.3  # skewed: some device is dominated by one class
    uniform = [np.bincount(DigitsPartition(i, 10, 1000.0, 0).load()[1], minlength=10) / len(parts[i]) for i in range(3)]
    assert all(float(p.max()) < 0.2 for p in uniform)


def test_bad_plans_are_refused_with_every_reason() -> None:
    with pytest.raises(PlanError) as e:
        TrainPlan(rounds=0, clients=2, clients_per_round=3, delta=2.0, alpha=0)
    for word in ("rounds", "clients per round", "δ", "alpha"):
        assert word in str(e.value)


def test_device_budget_refuses_and_records(tmp_path: Path) -> None:
    budget = DeviceBudget.open(tmp_path / "d" / "privacy.json", budget=5.0)
    budget.record("run-a", 3.0)
    reopened = DeviceBudget.open(tmp_path / "d" / "privacy.json", budget=5.0)
    assert reopened.lifetime() == 3.0
    reopened.check("run-b", 2.0)  # exactly at the budget is allowed
    with pytest.raises(BudgetExceeded, match="over this device's budget"):
        reopened.check("run-b", 2.5)
    reopened.check("run-a", 4.0)  # the same run's ε replaces its earlier figure, it does not add
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(Exception, match="unreadable"):
        DeviceBudget.open(tmp_path / "bad.json", 5.0)


# ----- a real run -----


def _spend(d: DataDir) -> dict[str, list[float]]:
    store = d.store()
    try:
        rows = store.db.execute("SELECT device_id, epsilon FROM privacy_spend ORDER BY device_id, round").fetchall()
    finally:
        store.close()
    out: dict[str, list[float]] = {}
    for device, eps in rows:
        out.setdefault(device, []).append(eps)
    return out


@pytest.mark.slow
@pytest.mark.ray
def test_epsilon_is_cumulative_and_matches_opacus_own_accountant(trained: tuple[DataDir, TrainOutcome]) -> None:
    d, outcome = trained
    spend = _spend(d)
    assert sorted(spend) == [f"sim-{i:03d}" for i in range(4)]
    for i in range(4):
        eps = spend[f"sim-{i:03d}"]
        assert len(eps) == 3 and eps[0] < eps[1] < eps[2]  # grows round over round: never reset per round
        # Opacus' own accountant, stepped through the same history one optimizer step at a time.
        n = len(DigitsPartition(i, 4, PLAN.alpha, PLAN.seed).load()[0])
        rate, steps = steps_per_round(n, PLAN.batch_size, PLAN.local_epochs)
        accountant = RDPAccountant()
        for k in range(1, 4):
            for _ in range(steps):
                accountant.step(noise_multiplier=PLAN.noise_multiplier, sample_rate=rate)
            assert math.isclose(accountant.get_epsilon(delta=PLAN.delta), eps[k - 1], rel_tol=1e-9)
    accuracy = [r["test_accuracy"] for r in outcome.rounds]
    assert accuracy[-1] > 0.6 > accuracy[0]  # a DP run that learnt (0.1 is chance)


@pytest.mark.slow
@pytest.mark.ray
def test_same_seed_same_model_through_the_cli(trained: tuple[DataDir, TrainOutcome], tmp_path: Path) -> None:
    d, outcome = trained
    other, _ = DataDir.init(tmp_path / "again")
    args = ["--rounds", "3", "--clients", "4", "--noise-multiplier", "1.5", "--seed", "7", "--seeded-noise"]
    args += ["--local-epochs", "5", "--batch-size", "32", "--lr", "0.1"]  # PLAN's
    out = cli(other, "train", *args, "--json")
    doc = json.loads(out.stdout)
    assert doc["status"] == "completed" and doc["model_version"] == "digits@1"
    first_store, second_store = d.store(), other.store()
    try:
        first = Registry(first_store).get(outcome.model_version)
        second = Registry(second_store).get("digits@1")
    finally:
        first_store.close()
        second_store.close()
    assert first.weights_sha256 == second.weights_sha256
    assert [r["test_accuracy"] for r in doc["rounds"]] == [r["test_accuracy"] for r in outcome.rounds]


@pytest.mark.slow
@pytest.mark.ray
def test_registry_lineage_card_and_ledger_views(trained: tuple[DataDir, TrainOutcome]) -> None:
    d, outcome = trained
    listed = json.loads(cli(d, "models", "list", "--json").stdout)
    assert [m["version"] for m in listed] == [outcome.model_version]
    shown = json.loads(cli(d, "models", "show", outcome.model_version, "--json").stdout)
    card = shown["card"]
    assert card["training"]["run_id"] == outcome.run_id and card["training"]["rounds"] == 3
    assert card["training"]["participating_devices"] == [f"sim-{i:03d}" for i in range(4)]
    assert card["privacy"]["epsilon"] == max(e[-1] for e in _spend(d).values())
    assert len(card["metrics"]["per_round"]) == 4 and card["training"]["code_version"].startswith("fedfleet ")
    assert "| 3 |" in cli(d, "models", "show", outcome.model_version, "--card").stdout
    ledger = json.loads(cli(d, "privacy", "ledger", "--json").stdout)
    assert {r["device"] for r in ledger} == {f"sim-{i:03d}" for i in range(4)}
    assert all(r["model_version"] == outcome.model_version for r in ledger)
    # Per device: its training row (3 rounds), then its drift-reference row (2 noised count queries), both in its
    # lifetime ε.
    assert [(r["purpose"], r["rounds"]) for r in ledger if r["device"] == "sim-000"] == [
        ("training", 3),
        ("drift-reference", 2),
    ]
    training, reference = (r for r in ledger if r["device"] == "sim-000")
    assert 0 < reference["epsilon"] <= 0.5
    assert reference["lifetime_epsilon"] == pytest.approx(training["epsilon"] + reference["epsilon"])
    cli(d, "models", "show", "digits@99", ok=False)


@pytest.mark.slow
@pytest.mark.ray
def test_release_is_byte_identical_parity_checked_and_carries_its_metadata(
    trained: tuple[DataDir, TrainOutcome],
) -> None:
    d, outcome = trained
    first = release_model_version(d, outcome.model_version)
    again = release_model_version(d, outcome.model_version)
    assert first.release.created and not again.release.created  # same bytes: nothing changed
    assert first.release.release.sha256 == again.release.release.sha256
    store = d.store()
    try:
        weights = Registry(store).get(outcome.model_version).weights
    finally:
        store.close()
    assert export_tflite(weights) == export_tflite(weights)
    assert first.facts["parity_max_abs_diff"] <= PARITY_TOLERANCE
    custom = first.release.release.custom
    reference = DriftReference.from_metadata(custom["drift_reference"])
    assert reference.n_features == 64 and reference.n_classes == 10
    assert np.all(np.diff(reference.feature_edges, axis=1) >= 0)
    assert np.array_equal(reference.feature_ranges, np.tile([0.0, 1.0], (64, 1)))  # public bounds, not the data's
    assert custom["model_card"]["privacy"]["drift_reference"]["feature_ranges"] == "public schema bounds [0, 1]"
    assert custom["probe"]["source"] == "held-out"
    assert float(custom["model_card"]["privacy"]["epsilon"]) > 0  # canonical JSON: numbers as decimal strings

    quantized = json.loads(cli(d, "release", outcome.model_version, "--quantize", "int8", "--json").stdout)
    assert quantized["release"] == "digits@1-int8" and quantized["export"]["bytes"] < quantized["export"]["float_bytes"]
    assert abs(quantized["export"]["accuracy_tflite"] - quantized["export"]["accuracy_float_tflite"]) < 0.05


@pytest.mark.slow
@pytest.mark.ray
def test_bad_release_requests_change_nothing(trained: tuple[DataDir, TrainOutcome], tmp_path: Path) -> None:
    d, outcome = trained
    before = cli(d, "releases", "list", "--json").stdout
    assert "no model version 'digits@42'" in cli(d, "release", "digits@42", ok=False).stderr
    assert "unknown quantization" in cli(d, "release", outcome.model_version, "--quantize", "int3", ok=False).stderr
    assert "--name" in cli(d, "release", outcome.model_version, "--name", "x", ok=False).stderr
    assert cli(d, "releases", "list", "--json").stdout == before


@pytest.mark.slow
@pytest.mark.ray
def test_an_agent_installs_and_runs_the_trained_release(trained: tuple[DataDir, TrainOutcome], tmp_path: Path) -> None:
    d, outcome = trained
    release = release_model_version(d, outcome.model_version).release.release
    coordinator = CoordinatorProcess(d, None).start()
    agent = enroll_agent(d, tmp_path / "devices", "pi-fl", coordinator=coordinator).start()
    try:
        cli(d, "assign", "pi-fl", release.id)
        wait_for(lambda: agent.status().get("release") == release.id, 60, 0.2, what="the trained release committed")
        status = agent.status()
        active = agent.config.state_dir / "slots" / status["active_slot"] / "model.tflite"
        x_test, y_test = held_out(PLAN.seed)
        model = load_model(active)
        predictions = np.array([int(model.predict(x[None]).argmax()) for x in x_test[:100]])
        assert (predictions == y_test[:100]).mean() > 0.6  # the device classifies digits with it
    finally:
        agent.kill()
        coordinator.kill()


# ----- the ledger's refusals -----


@pytest.mark.slow
@pytest.mark.ray
def test_ledger_skips_spent_devices_and_clients_refuse_or_fail_with_forensics(tmp_path: Path) -> None:
    d, _ = DataDir.init(tmp_path / "data")
    store = d.store()
    Ledger(store, d.config().epsilon_budget).set_budget("sim-001", 0.5)  # the coordinator knows: too little
    store.close()
    devices = d.root / "fl-devices"
    # sim-002's own record says it spent its budget elsewhere (the coordinator does not know): it must refuse.
    DeviceBudget.open(devices / "sim-002" / "privacy.json", 10.0).record("run-elsewhere", 10.0)
    # sim-003's record is corrupt: it cannot know its spending, so it fails its rounds with that reason.
    (devices / "sim-003").mkdir(parents=True)
    (devices / "sim-003" / "privacy.json").write_text("{corrupt")

    outcome = run_training(d.root, TrainPlan(rounds=2, clients=4, noise_multiplier=1.0, seed=3))

    assert outcome.status == "completed", outcome.error
    kinds = {(i["device_id"], i["round"], i["kind"]) for i in outcome.incidents}
    assert ("sim-001", 1, "skipped-budget") in kinds
    assert ("sim-002", 1, "refused") in kinds
    assert ("sim-003", 1, "error") in kinds and ("sim-003", 2, "error") in kinds
    assert not any(dev == "sim-002" and rnd == 2 for dev, rnd, _ in kinds)  # a refuser is not asked again
    refusal = next(i for i in outcome.incidents if i["kind"] == "refused")
    assert "budget" in refusal["detail"]
    assert "unreadable" in next(i["detail"] for i in outcome.incidents if i["kind"] == "error")
    assert sorted(_spend(d)) == ["sim-000"]  # only the device that trained spent ε
    assert [r["selected"] for r in outcome.rounds[1:]] == [3, 2]
    assert [r["completed"] for r in outcome.rounds[1:]] == [1, 1]


@pytest.mark.slow  # `fedfleet train` imports torch and Flower
def test_a_fleet_without_budget_fails_clearly_and_changes_nothing(tmp_path: Path) -> None:
    d, _ = DataDir.init(tmp_path / "data")
    store = d.store()
    for i in range(2):
        Ledger(store, 10.0).set_budget(f"sim-{i:03d}", 0.1)
    store.close()
    out = cli(d, "train", "--rounds", "1", "--clients", "2", ok=False)
    assert "too little privacy budget" in out.stderr
    assert _spend(d) == {}
    assert json.loads(cli(d, "models", "list", "--json").stdout) == []


@pytest.mark.slow  # `fedfleet train` imports torch and Flower
def test_secure_mode_without_its_generator_is_refused_before_anything_runs(tmp_path: Path) -> None:
    d, _ = DataDir.init(tmp_path / "data")
    out = cli(d, "train", "--rounds", "1", "--clients", "2", "--secure-mode", ok=False)
    assert "torchcsprng" in out.stderr
    assert json.loads(cli(d, "models", "list", "--json").stdout) == []
    store = d.store()
    try:
        assert store.db.execute("SELECT COUNT(*) FROM fl_runs").fetchone()[0] == 0
    finally:
        store.close()


def test_epsilon_of_an_empty_history_is_zero() -> None:
    assert epsilon_of([], 1e-5) == 0.0


@pytest.mark.slow
@pytest.mark.ray
def test_a_run_whose_engine_fails_before_any_round_is_tried_once_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine that dies under the ServerApp before any round (its Ray node, its SuperLink or its flwr-simulation
    process gone) leaves the run recorded as failed with ENGINE_STOPPED. The first attempt here is that failure as
    the registry records it; the second is a real Flower run."""
    d, _ = DataDir.init(tmp_path / "data")
    real = training._simulate
    attempts: list[str] = []

    def failing_once(*args: Any, **kwargs: Any) -> tuple[str, str]:
        if attempts:
            run_id, failure = real(*args, **kwargs)
        else:
            run_id, failure = "run-engine-died", "RuntimeError: Simulation Runtime crashed."
            store = d.store()
            runs = TrainingRuns(store)
            runs.start(run_id, "digits", "simulation", {})
            runs.finish(run_id, "failed", ENGINE_STOPPED)
            store.close()
        attempts.append(run_id)
        return run_id, failure

    monkeypatch.setattr(training, "_simulate", failing_once)
    outcome = run_training(d.root, TrainPlan(rounds=1, clients=2, noise_multiplier=1.5, seed=7))
    assert outcome.status == "completed", outcome.error
    assert len(attempts) == 2 and outcome.run_id == attempts[1] != "run-engine-died"
    store = d.store()
    try:
        assert TrainingRuns(store).run("run-engine-died")["status"] == "failed"  # kept as it happened
    finally:
        store.close()
