"""Privacy units side by side (issue 19): device-level DP beside the record-level default.

`--privacy-unit device` trains without noise on the devices; the coordinator samples devices (Poisson), clips each
whole-device update adaptively, averages with a fixed denominator and adds Gaussian noise, and charges every device
of the population the ε of Opacus' RDP accountant over (noise multiplier, device sample rate, rounds). The ledger
names the unit on every row, and so does the model card. Every ε here is checked against Opacus' own
`RDPAccountant`, stepped one round at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg
from opacus.accountants import RDPAccountant

from server.datadir import DataDir
from server.fl.device_dp import AdaptiveClipping, DeviceAccounting, device_accounting, poisson_sample
from server.fl.plan import PlanError, TrainPlan
from server.fl.registry import Ledger, Registry, TrainingRuns, model_card, model_card_markdown
from server.fl.server_app import TrainingError, _Device, _DeviceLevel, _Run
from server.fl.training import run_training

DELTA = 1e-5
# 4 devices, 2 per round in expectation (q = 0.5), 3 rounds; the clipped-count noise is raised to 1 so that
# noise multiplier 1 is possible with so few devices (its default, 2 / 20, would need z < 0.2).
PLAN = TrainPlan(
    rounds=3,
    clients=4,
    clients_per_round=2,
    noise_multiplier=1.0,
    local_epochs=1,
    delta=DELTA,
    privacy_unit="device",
    clip_count_stddev=1.0,
    device_clip_norm=0.5,
)


def opacus_epsilon(noise: float, rate: float, steps: int, delta: float = DELTA) -> float:
    """Opacus' own accountant after `steps` steps of the sampled Gaussian at (noise, rate)."""
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise, sample_rate=rate)
    return float(accountant.get_epsilon(delta=delta))


def cli(d: DataDir, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args, "--data-dir", str(d.root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )


# ----- the accountant and the refusals (no Ray) -----


def test_device_level_epsilon_is_opacus_rdp_over_noise_device_rate_and_rounds() -> None:
    a = device_accounting(PLAN, 4)
    assert (a.sample_rate, a.expected_clients, a.noise_multiplier, a.count_stddev) == (0.5, 2.0, 1.0, 1.0)
    # The noise on the updates is larger than z: z^-2 = z_update^-2 + (2 sigma_b)^-2 (Andrew et al.).
    assert a.update_noise_multiplier**-2 + (2 * a.count_stddev) ** -2 == pytest.approx(a.noise_multiplier**-2)
    for rounds in (1, 2, 3):
        assert a.epsilon(rounds) == pytest.approx(opacus_epsilon(1.0, 0.5, rounds), rel=1e-9)
    assert a.epsilon(0) == 0.0
    # A target ε: the noise is chosen so the planned rounds end at or below it, at the device sample rate.
    target = TrainPlan(**{**PLAN.to_dict(), "noise_multiplier": None, "target_epsilon": 4.0})
    t = device_accounting(target, 4)
    assert opacus_epsilon(t.noise_multiplier, 0.5, 3) <= 4.0
    assert t.noise_multiplier > 1.0  # ε 4 needs more noise than ε 6.5 of noise multiplier 1
    # A fleet-sized plan: 1000 devices, 100 per round, 100 rounds.
    big = device_accounting(TrainPlan(rounds=100, clients=1000, clients_per_round=100, privacy_unit="device"), 1000)
    assert big.count_stddev == 5.0 and big.sample_rate == 0.1
    assert big.epsilon(100) == pytest.approx(opacus_epsilon(1.0, 0.1, 100), rel=1e-9)


def test_bad_device_plans_are_refused_with_a_clear_reason() -> None:
    with pytest.raises(PlanError, match="privacy unit must be 'record' or 'device'"):
        TrainPlan(privacy_unit="user")
    with pytest.raises(PlanError, match="needs a noise multiplier or a target ε"):
        TrainPlan(privacy_unit="device", noise_multiplier=None)
    with pytest.raises(PlanError, match="record-level DP only"):
        TrainPlan(privacy_unit="device", secure_mode=True)
    with pytest.raises(PlanError, match="clip norm must be > 0"):
        TrainPlan(privacy_unit="device", device_clip_norm=0)
    # Too few devices per round for adaptive clipping at this noise (sigma_b = 2 / 20 by default).
    few = TrainPlan(**{**PLAN.to_dict(), "clip_count_stddev": None})
    with pytest.raises(PlanError, match=r"too few for adaptive clipping.*more than 10 devices per round"):
        device_accounting(few, 4)
    # A target ε no noise multiplier meets, and one that needs more noise than the clipped count can carry.
    with pytest.raises(PlanError, match=r"target ε 0\.001 cannot be met"):
        device_accounting(TrainPlan(**{**PLAN.to_dict(), "noise_multiplier": None, "target_epsilon": 0.001}), 4)
    with pytest.raises(PlanError, match=r"needs noise multiplier .* raise --clients-per-round"):
        device_accounting(TrainPlan(**{**PLAN.to_dict(), "noise_multiplier": None, "target_epsilon": 0.5}), 4)
    # The record unit is no plan for this accountant.
    with pytest.raises(PlanError, match="not 'device'"):
        device_accounting(TrainPlan(), 10)


@pytest.mark.slow
def test_the_cli_refuses_a_bad_device_plan_before_anything_runs(tmp_path: Path) -> None:
    d, _ = DataDir.init(tmp_path / "data")
    out = cli(d, "train", "--privacy-unit", "device", "--clients", "4", "--clients-per-round", "2", "--rounds", "2")
    assert out.returncode != 0
    assert "too few for adaptive clipping" in out.stderr and "Traceback" not in out.stderr
    out = cli(d, "train", "--privacy-unit", "device", "--no-dp", "--clients", "4")
    assert out.returncode != 0 and "needs a noise multiplier or a target ε" in out.stderr
    with d.store() as store:
        assert TrainingRuns(store).list() == []  # no run was started, nothing recorded
        assert Ledger(store, 10.0).rows() == []


# ----- the mechanism -----


def _accounting(expected: float = 2.0) -> DeviceAccounting:
    return DeviceAccounting(4, expected, 0.5, 1.0, 1.2, 1.0, DELTA, 3)


def test_adaptive_clipping_clips_each_device_averages_over_the_expected_count_and_adds_the_noise() -> None:
    a = _accounting()
    current = [np.zeros(200_000, dtype=np.float32)]
    big = [np.full(200_000, 1.0, dtype=np.float32)]  # norm ~447: clipped to C
    small = [np.full(200_000, 1e-4, dtype=np.float32)]  # norm ~0.045: within C
    clip = AdaptiveClipping(a, np.random.default_rng(3), initial_clipping_norm=0.5)
    new, r = clip.aggregate(current, [big, small])
    assert (r.devices, r.unclipped, r.clipping_norm) == (2, 1, 0.5)
    assert r.noise_stddev == pytest.approx(1.2 * 0.5 / 2.0)  # z_update x C / m
    expected_mean = (0.5 / np.sqrt(200_000) + 1e-4) / 2.0  # the clipped big one, the small one, over m = 2
    residual = new[0].astype(np.float64) - expected_mean
    assert new[0].dtype == np.float32
    assert abs(residual.mean()) < 5 * r.noise_stddev / np.sqrt(200_000)
    assert residual.std() == pytest.approx(r.noise_stddev, rel=0.01)
    # Without noise the clipped sum's norm is at most C x devices: the sensitivity the accountant assumes.
    quiet = AdaptiveClipping(DeviceAccounting(4, 1.0, 0.25, 1e-9, 1e-9, 1e-9, DELTA, 3), np.random.default_rng(0), 0.5)
    one, _ = quiet.aggregate(current, [big])
    assert float(np.linalg.norm(one[0].astype(np.float64))) == pytest.approx(0.5, rel=1e-4)
    # An empty round still releases noise.
    empty, r = clip.aggregate(current, [])
    assert r.devices == 0 and float(np.std(empty[0])) > 0
    with pytest.raises(ValueError, match="shapes"):
        clip.aggregate(current, [[np.zeros(3, dtype=np.float32)]])


def test_the_clipping_norm_moves_towards_the_update_norms_unlike_flowers_wrapper() -> None:
    a = DeviceAccounting(100, 50.0, 0.5, 1.0, 1.2, 1e-9, DELTA, 3)  # almost no count noise: the rule itself
    current = [np.zeros(10, dtype=np.float32)]
    large = [[np.full(10, 10.0, dtype=np.float32)]] * 50
    tiny = [[np.full(10, 1e-6, dtype=np.float32)]] * 50
    grow = AdaptiveClipping(a, np.random.default_rng(0), 0.1)
    for _ in range(5):
        grow.aggregate(current, large)  # every update clipped: C must grow
    assert grow.clipping_norm == pytest.approx(0.1 * np.exp(0.2 * 0.5 * 5))
    shrink = AdaptiveClipping(a, np.random.default_rng(0), 0.1)
    shrink.aggregate(current, tiny)  # none clipped: C must shrink
    assert shrink.clipping_norm == pytest.approx(0.1 * np.exp(-0.2 * 0.5))
    # Flower 1.41's wrapper puts the clipped fraction into the same rule: all clipped makes its norm shrink.
    flower = DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), 0.0, 50, initial_clipping_norm=0.1)
    flower._geometric_update(1.0)
    assert flower.clipping_norm < 0.1


def test_poisson_sampling_takes_everyone_at_rate_one_and_about_q_otherwise() -> None:
    rng = np.random.default_rng(0)
    assert poisson_sample(list(range(7)), 1.0, rng) == list(range(7))
    sizes = [len(poisson_sample(list(range(100)), 0.1, rng)) for _ in range(200)]
    assert 8 < float(np.mean(sizes)) < 12 and len(set(sizes)) > 3  # varies: not a fixed-size sample


def test_the_ledger_names_the_unit_of_every_row(tmp_path: Path) -> None:
    d, _ = DataDir.init(tmp_path / "data")
    with d.store() as store:
        runs, ledger = TrainingRuns(store), Ledger(store, 10.0)
        old_plan = {k: v for k, v in TrainPlan().to_dict().items() if k != "privacy_unit"}  # before units existed
        runs.start("run-a", "digits", "simulation", old_plan)
        runs.start("run-b", "digits", "simulation", PLAN.to_dict())
        ledger.record("run-a", "sim-000", 1, 1.5, DELTA)
        ledger.record("run-b", "sim-000", 1, 2.0, DELTA)
        rows = ledger.rows()
    assert [(r["run"], r["unit"], r["lifetime_epsilon"]) for r in rows] == [
        ("run-a", "record", 1.5),
        ("run-b", "device", 3.5),
    ]
    shown = cli(d, "privacy", "ledger")
    assert shown.returncode == 0, shown.stderr
    assert "unit" in shown.stdout and "device" in shown.stdout and "record" in shown.stdout
    as_json = json.loads(cli(d, "privacy", "ledger", "--json").stdout)
    assert {r["unit"] for r in as_json} == {"record", "device"}


def test_devices_without_budget_for_the_run_are_left_out_and_the_rest_charged_every_round(tmp_path: Path) -> None:
    d, _ = DataDir.init(tmp_path / "data")
    with d.store() as store:
        TrainingRuns(store).start("run-x", "digits", "simulation", PLAN.to_dict())
        run = _Run("run-x", PLAN, store, 10.0)
        for i in range(4):  # sim-003 has spent 5 of its 10 already: the run's ε (6.5 at q = 1/2) does not fit
            run.devices[i] = _Device(i, f"sim-00{i}", 100, spent_before=5.0 if i == 3 else 0.0, budget=10.0)
        level = _DeviceLevel.start(run)
        # Without sim-003 the population is 3, so q = 2/3 and the run's ε grows; the other three still fit.
        assert [dev.device_id for dev in level.population] == ["sim-000", "sim-001", "sim-002"]
        assert level.accounting.sample_rate == pytest.approx(2 / 3)
        assert run.devices[3].skipped
        assert [(i["device_id"], i["kind"]) for i in TrainingRuns(store).incidents("run-x")] == [
            ("sim-003", "skipped-budget")
        ]
        with store.transaction():
            level.charge(1)
        rows = Ledger(store, 10.0).rows()
        assert [r["device"] for r in rows] == ["sim-000", "sim-001", "sim-002"]
        assert all(r["epsilon"] == pytest.approx(opacus_epsilon(1.0, 2 / 3, 1), rel=1e-9) for r in rows)
        # Nobody with room: the run stops in one sentence.
        TrainingRuns(store).start("run-y", "digits", "simulation", PLAN.to_dict())
        broke = _Run("run-y", PLAN, store, 10.0)
        broke.devices[0] = _Device(0, "sim-009", 100, spent_before=9.0, budget=10.0)
        with pytest.raises(TrainingError, match="no device has privacy budget"):
            _DeviceLevel.start(broke)


# ----- on the simulation engine -----


@pytest.mark.slow
@pytest.mark.ray
def test_device_level_dp_trains_on_flower_with_its_epsilon_in_the_ledger_and_the_card(tmp_path: Path) -> None:
    d, _ = DataDir.init(tmp_path / "data")
    outcome = run_training(d.root, PLAN)
    assert outcome.status == "completed", outcome.error
    expected = opacus_epsilon(1.0, 0.5, 3)
    with d.store() as store:
        rows = [r for r in Ledger(store, d.config().epsilon_budget).rows() if r.get("purpose") == "training"]
        version = Registry(store).get(outcome.model_version)
        spend = store.db.execute(
            "SELECT device_id, round, epsilon FROM privacy_spend WHERE run_id = ? ORDER BY device_id, round",
            [outcome.run_id],
        ).fetchall()
    # Every device of the population is charged every round, sampled or not, at the accountant's ε.
    assert sorted(r["device"] for r in rows) == ["sim-000", "sim-001", "sim-002", "sim-003"]
    assert all(r["unit"] == "device" and r["rounds"] == 3 for r in rows)
    assert all(r["epsilon"] == pytest.approx(expected, rel=1e-9) for r in rows)
    assert [(dev, rnd) for dev, rnd, _ in spend] == [(f"sim-00{i}", r) for i in range(4) for r in (1, 2, 3)]
    for _, rnd, eps in spend:
        assert eps == pytest.approx(opacus_epsilon(1.0, 0.5, rnd), rel=1e-9)
    assert [r["epsilon_max"] for r in outcome.rounds[1:]] == pytest.approx(
        [opacus_epsilon(1.0, 0.5, n) for n in (1, 2, 3)]
    )
    # The devices trained without DP of their own: no DP-SGD accountant history for the run in their records (the
    # drift reference's count queries, which are record-level, may have written one).
    for record in (d.root / "fl-devices").glob("*/privacy.json"):
        assert outcome.run_id not in json.loads(record.read_text()).get("runs", {})
    card = model_card(version)
    p = card["privacy"]
    assert p["unit"] == "device" and p["epsilon"] == pytest.approx(expected, rel=1e-9) and p["delta"] == DELTA
    assert "not against the coordinator" in p["protects"]
    assert p["device_level"]["population"] == 4 and p["device_level"]["sample_rate"] == 0.5
    assert len(p["device_level"]["clipping_norms"]) == 3 and p["device_level"]["clipping_norms"][0] == 0.5
    assert "privacy unit: device" in model_card_markdown(version)
    assert np.isfinite(outcome.rounds[-1]["test_accuracy"])
