"""ε that only goes up and that the coordinator checks (issue 19).

The device keeps its Opacus accountant history in its durable privacy record and restores it every round, so a
lost Flower context (a SuperNode or agent restart) does not reset its ε; the coordinator recomputes every
reported ε from the plan and the client's noise, sample rate and steps with the same accountant, records the
larger and records a disagreement as an incident and an audit entry; nothing lowers a recorded ε; the ledger
shows lifetime δ beside lifetime ε. The accountant is always Opacus' own `RDPAccountant`, stepped here one
optimizer step at a time as Opacus does during training.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant

from server import audit
from server.datadir import DataDir
from server.fl import client_app
from server.fl.data import DigitsPartition
from server.fl.model import initial_weights
from server.fl.plan import TrainPlan
from server.fl.privacy import DeviceBudget, History, check_epsilon, epsilon_of, steps_per_round
from server.fl.registry import Ledger, TrainingRuns
from server.fl.server_app import _Device, _Run
from server.fl.training import TEST_CLIENTAPP_ENV, run_training

# Opacus' per-sample gradient hooks on a first layer whose inputs need no gradient: torch's note, harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

DELTA = 1e-5


def opacus_epsilon(noise: float, rate: float, steps: int, delta: float = DELTA) -> float:
    """Opacus' own accountant after `steps` optimizer steps at (noise, rate)."""
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise, sample_rate=rate)
    return float(accountant.get_epsilon(delta=delta))


# ----- the device's record -----


def test_a_device_record_keeps_its_history_durably_and_never_lowers_a_run_epsilon(tmp_path: Path) -> None:
    path = tmp_path / "pi-1" / "privacy.json"
    record = DeviceBudget.open(path, budget=10.0)
    assert record.record("run-a", 1.5, history=[(1.1, 0.1, 40)], delta=DELTA, noise=1.1) == 1.5

    reopened = DeviceBudget.open(path, budget=10.0)  # a restarted agent or SuperNode
    assert reopened.history("run-a") == [(1.1, 0.1, 40)] and reopened.noise("run-a") == 1.1
    assert reopened.run_epsilon("run-a") == 1.5 and reopened.history("run-b") == []

    # A lower figure and a shorter history (what a device that lost its context would compute) change nothing.
    assert reopened.record("run-a", 0.9, history=[(1.1, 0.1, 20)], delta=DELTA, noise=1.1) == 1.5
    again = DeviceBudget.open(path, budget=10.0)
    assert again.run_epsilon("run-a") == 1.5 and again.history("run-a") == [(1.1, 0.1, 40)]
    assert sorted(p.name for p in path.parent.iterdir()) == ["privacy.json"]  # no temporary file left behind

    # A record from before histories were kept still opens; one whose history is garbage is refused.
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"budget": 10.0, "spent": {"run-x": 2.0}}))
    assert DeviceBudget.open(old, 10.0).lifetime() == 2.0 and DeviceBudget.open(old, 10.0).history("run-x") == []
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"spent": {"run-x": 2.0}, "runs": {"run-x": {"history": "x"}}}))
    with pytest.raises(Exception, match="unreadable"):
        DeviceBudget.open(bad, 10.0)
    negative = tmp_path / "negative.json"
    negative.write_text(json.dumps({"spent": {"run-x": -3.0}}))
    with pytest.raises(Exception, match="unreadable"):
        DeviceBudget.open(negative, 10.0)


# ----- the device's ClientApp, called directly with the message a round sends it -----


def _train_message(run_id: str, server_round: int, node_id: int, **overrides: Any) -> Message:
    config: dict[str, Any] = {
        "run-id": run_id,
        "seed": 0,
        "data-seed": 0,
        "alpha": 0.5,
        "private": True,
        "target-epsilon": -1.0,
        "noise-multiplier": 1.1,
        "delta": DELTA,
        "max-grad-norm": 1.0,
        "planned-rounds": 3,
        "local-epochs": 1,
        "batch-size": 32,
        "lr": 0.1,
        "secure-mode": False,
        "seeded-noise": False,
        "server-round": server_round,
        "epsilon-budget": 10.0,
        **overrides,
    }
    content = RecordDict({"arrays": ArrayRecord(numpy_ndarrays=initial_weights(0)), "config": ConfigRecord(config)})
    metadata = Metadata(
        run_id=1,
        message_id=f"m{server_round}",
        src_node_id=0,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=600.0,
        message_type=MessageType.TRAIN,
    )
    return Message(content=content, metadata=metadata)


def _fresh_context(node_id: int, node_config: dict[str, Any]) -> Context:
    """What a restarted SuperNode hands the ClientApp: no state from before."""
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})


def test_a_client_that_loses_its_context_every_round_still_reports_the_cumulative_epsilon(tmp_path: Path) -> None:
    app = client_app.build_client_app()
    node_config = {
        "device-id": "pi-7",
        "partition-id": 0,
        "num-partitions": 10,
        "state-dir": str(tmp_path),
        "consent-training": True,
    }
    n = len(DigitsPartition(0, 10, 0.5, 0).load()[0])
    rate, steps = steps_per_round(n, 32, 1)

    reported: list[float] = []
    for server_round in (1, 2, 3):
        reply = app(_train_message("run-a", server_round, 7), _fresh_context(7, node_config))
        assert not reply.has_error(), reply.error
        metrics = reply.content["metrics"]
        assert isinstance(metrics, MetricRecord)
        reported.append(float(metrics["epsilon"]))  # type: ignore[arg-type]
        assert metrics["accountant-steps"] == [server_round * steps]
        assert metrics["accountant-noise"] == [1.1] and metrics["accountant-rate"] == [rate]

    # Opacus' own accountant over all the rounds' steps, not the last round's alone.
    assert reported[0] < reported[1] < reported[2]
    for k, eps in enumerate(reported, start=1):
        assert math.isclose(eps, opacus_epsilon(1.1, rate, k * steps), rel_tol=1e-9)
    record = DeviceBudget.open(tmp_path / "pi-7" / "privacy.json", 10.0)
    assert record.history("run-a") == [(1.1, rate, 3 * steps)] and record.run_epsilon("run-a") == reported[2]


def test_private_training_without_a_privacy_record_is_refused_and_records_nothing(tmp_path: Path) -> None:
    app = client_app.build_client_app()
    node_config = {"device-id": "pi-8", "partition-id": 0, "num-partitions": 10, "consent-training": True}
    with pytest.raises(Exception, match="state-dir"):
        app(_train_message("run-a", 1, 8), _fresh_context(8, node_config))
    assert list(tmp_path.iterdir()) == []


# ----- the coordinator's check -----


def test_check_epsilon_recomputes_from_the_plan_and_what_the_client_reports() -> None:
    noise, rate, steps = 1.1, 1 / 6, 12
    honest = opacus_epsilon(noise, rate, steps)
    plan = {"delta": DELTA, "sample_rate": rate, "min_steps": steps, "max_noise": noise}

    ok = check_epsilon(honest, [(noise, rate, steps)], **plan)
    assert not ok.mismatch and ok.recorded == ok.reported and math.isclose(ok.recomputed, honest, rel_tol=1e-9)

    # Under-reported ε, honest noise, rate and steps: recorded at what they imply.
    low = check_epsilon(honest / 2, [(noise, rate, steps)], **plan)
    assert low.mismatch and math.isclose(low.recorded, honest, rel_tol=1e-9)
    assert "below" in " ".join(low.problems)

    # A history that lost rounds (fewer steps than the rounds it trained), more noise than the plan gives, a
    # lower sample rate: each is moved to the plan's side before the accountant runs.
    for history, word in (
        ([(noise, rate, steps // 2)], "steps"),
        ([(noise * 3, rate, steps)], "noise multiplier"),
        ([(noise, rate / 4, steps)], "sample rate"),
    ):
        claimed = epsilon_of(history, DELTA)
        check = check_epsilon(claimed, history, **plan)
        assert check.mismatch and word in " ".join(check.problems)
        assert math.isclose(check.recorded, honest, rel_tol=1e-9), (word, check)

    # Nothing readable: the plan alone is charged, and the caller learns the history was unusable.
    garbage = check_epsilon(math.nan, [(float("nan"), rate, steps)], **plan)
    assert not garbage.history_usable and math.isclose(garbage.recorded, honest, rel_tol=1e-9)
    assert math.isnan(garbage.reported)

    # A lower figure never lowers what was recorded before.
    assert check_epsilon(honest, [(noise, rate, steps)], **plan, previous=honest * 2).recorded == honest * 2


def _metrics(epsilon: float, history: History) -> MetricRecord:
    return MetricRecord(
        {
            "epsilon": epsilon,
            "accountant-noise": [h[0] for h in history],
            "accountant-rate": [h[1] for h in history],
            "accountant-steps": [h[2] for h in history],
        }
    )


def _ledger_cli(d: DataDir, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "privacy", "ledger", "--data-dir", str(d.root), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_the_coordinator_records_the_larger_epsilon_with_an_incident_and_never_lowers_it(tmp_path: Path) -> None:
    d, _ = DataDir.init(tmp_path / "data")
    plan = TrainPlan(rounds=3, clients=1, noise_multiplier=1.1, local_epochs=1, delta=DELTA)
    examples = 150
    rate, steps = steps_per_round(examples, plan.batch_size, plan.local_epochs)
    with d.store() as store:
        run = _Run("run-check", plan, store, 10.0)
        run.runs.start("run-check", "digits", "simulation", plan.to_dict())
        device = _Device(1, "pi-1", examples)

        # Round 1, honest.
        first = opacus_epsilon(1.1, rate, steps)
        with store.transaction():
            run.account(1, device, _metrics(first, [(1.1, rate, steps)]))
        assert math.isclose(device.epsilon, first, rel_tol=1e-9)
        assert TrainingRuns(store).incidents("run-check") == []

        # Round 2: it reports round 1's ε again, with its honest noise, rate and two rounds of steps.
        second = opacus_epsilon(1.1, rate, 2 * steps)
        with store.transaction():
            run.account(2, device, _metrics(first, [(1.1, rate, 2 * steps)]))
        assert math.isclose(device.epsilon, second, rel_tol=1e-9)
        incidents = TrainingRuns(store).incidents("run-check")
        assert [(i["round"], i["device_id"], i["kind"]) for i in incidents] == [(2, "pi-1", "epsilon-mismatch")]
        assert "below" in incidents[0]["detail"]
        entry = audit.entries(store, action="privacy.epsilon_mismatch")[0]
        assert entry["subject"] == "pi-1" and math.isclose(entry["detail"]["recorded_epsilon"], second)
        assert audit.verify(store)[1] == []

        # Round 3: a history that forgot its earlier rounds (a lost context) and a lower ε: not lower for it.
        third = opacus_epsilon(1.1, rate, 3 * steps)
        with store.transaction():
            run.account(3, device, _metrics(first, [(1.1, rate, steps)]))
        assert math.isclose(device.epsilon, third, rel_tol=1e-9)

        ledger = Ledger(store, 10.0)
        # A later, lower figure straight into the ledger is raised to the run's ε; bad figures change nothing.
        assert math.isclose(ledger.record("run-check", "pi-1", 4, 0.01, DELTA), third, rel_tol=1e-9)
        for bad_epsilon, bad_delta in ((math.nan, DELTA), (-1.0, DELTA), (1.0, 0.0), (math.inf, DELTA)):
            with pytest.raises(ValueError, match="nothing was recorded"):
                ledger.record("run-check", "pi-1", 5, bad_epsilon, bad_delta)
        assert math.isclose(ledger.run_epsilon("run-check", "pi-1"), third, rel_tol=1e-9)
        rows = list(store.db.query("SELECT * FROM privacy_spend ORDER BY round"))
        assert [r["round"] for r in rows] == [1, 2, 3, 4] and [r["mismatch"] for r in rows] == [0, 1, 1, 0]
        assert rows[1]["reported_epsilon"] == first and math.isclose(rows[1]["recomputed_epsilon"], second)

        # The schema itself refuses to lower or delete what the ledger holds, whoever writes SQL.
        for sql in (
            "UPDATE privacy_spend SET epsilon = 0.001 WHERE round = 3",
            "DELETE FROM privacy_spend WHERE round = 1",
            "INSERT INTO privacy_spend (run_id, device_id, round, epsilon, delta, at)"
            " VALUES ('run-check', 'pi-1', 9, 0.001, 1e-5, 0)",
        ):
            with pytest.raises(sqlite3.IntegrityError, match="privacy ledger"):
                store.db.execute(sql)
        assert list(store.db.query("SELECT * FROM privacy_spend ORDER BY round")) == rows

        # A second run: lifetime ε and δ are sums over runs.
        run.runs.start("run-next", "digits", "simulation", plan.to_dict())
        ledger.record("run-next", "pi-1", 1, 0.5, 2e-5)

    rows = json.loads(_ledger_cli(d, "--json").stdout)
    assert [(r["run"], r["epsilon_mismatches"]) for r in rows] == [("run-check", 2), ("run-next", 0)]
    assert math.isclose(rows[0]["epsilon"], third, rel_tol=1e-9) and rows[0]["delta"] == DELTA
    assert math.isclose(rows[1]["lifetime_epsilon"], third + 0.5, rel_tol=1e-9)
    assert math.isclose(rows[1]["lifetime_delta"], DELTA + 2e-5, rel_tol=1e-12)
    table = _ledger_cli(d).stdout
    assert "lifetime δ" in table and "2 mismatches" in table and "3e-05" in table  # 1e-05 + 2e-05


# ----- a real Flower run -----


@pytest.mark.slow
@pytest.mark.ray
def test_a_flower_run_charges_the_cumulative_epsilon_to_a_forgetful_and_an_under_reporting_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d, _ = DataDir.init(tmp_path / "data")
    # Partition 0's device halves the ε it reports; partition 1's device loses its Flower context every round.
    monkeypatch.setenv(TEST_CLIENTAPP_ENV, "tests.server.simulated_clientapps:forgetful_and_under_reporting")
    plan = TrainPlan(rounds=3, clients=2, noise_multiplier=1.1, local_epochs=1, seed=2, delta=DELTA)

    outcome = run_training(d.root, plan)

    assert outcome.status == "completed", outcome.error
    with d.store() as store:
        spend = list(store.db.query("SELECT device_id, round, epsilon FROM privacy_spend ORDER BY device_id, round"))
        entries = audit.entries(store, action="privacy.epsilon_mismatch")
    for i, device in enumerate(("sim-000", "sim-001")):
        n = len(DigitsPartition(i, 2, plan.alpha, plan.seed).load()[0])
        rate, steps = steps_per_round(n, plan.batch_size, plan.local_epochs)
        recorded = [r["epsilon"] for r in spend if r["device_id"] == device]
        expected = [opacus_epsilon(1.1, rate, k * steps) for k in (1, 2, 3)]
        assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(recorded, expected, strict=True)), device
    mismatches = [(i["device_id"], i["round"]) for i in outcome.incidents if i["kind"] == "epsilon-mismatch"]
    assert mismatches == [("sim-000", 1), ("sim-000", 2), ("sim-000", 3)]  # the forgetful one reported right
    assert {e["subject"] for e in entries} == {"sim-000"} and len(entries) == 3
    rows = json.loads(_ledger_cli(d, "--json").stdout)
    ledger = {r["device"]: r for r in rows if r["purpose"] == "training"}  # the drift reference has rows too
    assert ledger["sim-000"]["epsilon_mismatches"] == 3 and ledger["sim-001"]["epsilon_mismatches"] == 0
    assert ledger["sim-001"]["lifetime_delta"] == DELTA
    # The forgetful device's own record holds the whole run's history.
    record = DeviceBudget.open(d.root / "fl-devices" / "sim-001" / "privacy.json", 10.0)
    assert math.isclose(record.run_epsilon(outcome.run_id), ledger["sim-001"]["epsilon"], rel_tol=1e-9)
