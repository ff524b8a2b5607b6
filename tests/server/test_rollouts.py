"""Rollouts end to end: real Mosquitto, the coordinator as a process (`fedfleet serve`), real agents inferring,
the `fedfleet rollout` CLI. Outcomes are read from the coordinator's database, never from log text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.crashpoints import ENV
from simulations.models import ModelFamily
from simulations.rig import RELEASES, Rig
from simulations.workload import SensorFault
from tests.support import Mosquitto, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]

FAST = ["--canary", "2", "--waves", "0.5,1.0", "--bake", "1.5", "--min-samples", "150", "--silent-after", "60"]


@pytest.fixture
def rig(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Rig]:
    r = Rig(tmp_path, devices=12, mqtt_url=mosquitto.url).setup()
    yield r
    r.stop()


def _decisions(status: dict[str, object]) -> list[str]:
    return [d["decision"] for d in status["decisions"]]  # type: ignore[attr-defined, index]


def test_healthy_release_goes_canary_to_everyone_with_every_decision_recorded(rig: Rig) -> None:
    started = rig.cli("rollout", "start", RELEASES["healthy"], "--fleet", rig.fleet_name, *FAST)
    assert [sum(w["devices"].values()) for w in started["waves"]] == [2, 4, 6]
    status = rig.wait_phase(started["id"], {"completed", "rolled_back", "paused"})
    assert status["phase"] == "completed", status["decisions"]
    steps = [d for d in _decisions(status) if d != "waiting"]
    assert steps == ["created", "start", "advance", "advance", "completed"]
    judged = [d for d in status["decisions"] if d["decision"] in ("advance", "completed")]
    for d in judged:
        verdicts = {g["metric"]: g["verdict"] for g in d["gates"]}
        assert set(verdicts) >= {"class_mix_shift", "input_max_psi", "failure_rate", "silent_fraction"}
        assert "fail" not in verdicts.values() and verdicts["class_mix_shift"] == "pass"
    rig.wait_running(RELEASES["healthy"], 12)
    actions = [e["action"] for e in rig.cli("audit", "list", "--limit", "100")]
    assert actions.count("rollout.advance") == 2 and "rollout.completed" in actions
    assert rig.cli("audit", "verify")["intact"]


def test_scrambled_release_is_stopped_at_the_canary_and_reverted(rig: Rig) -> None:
    started = rig.cli("rollout", "start", RELEASES["scrambled"], "--fleet", rig.fleet_name, *FAST)
    canary = rig.store_query("SELECT device_id FROM rollout_devices WHERE rollout_id = ? AND wave = 0", [started["id"]])
    status = rig.wait_phase(started["id"], {"rolled_back", "completed"})
    assert status["phase"] == "rolled_back"
    rollback = next(d for d in status["decisions"] if d["decision"] == "rollback")
    fired = {g["metric"]: g for g in rollback["gates"] if g["verdict"] == "fail"}
    assert "class_mix_shift" in fired and fired["class_mix_shift"]["value"] > 0.25
    assert rollback["wave"] == 0 and "class_mix_shift" in rollback["reason"]
    # The canary had committed the scrambled build, and is back on the base, as is everyone.
    for row in canary:
        kinds = {
            r["kind"]
            for r in rig.store_query(
                "SELECT kind FROM events WHERE device_id = ? AND release_id = ?",
                [row["device_id"], RELEASES["scrambled"]],
            )
        }
        assert "committed" in kinds
    assert rig.running(RELEASES["base"]) == 12
    never = rig.store_query(
        "SELECT count(*) AS n FROM assignments WHERE release_id = ? AND device_id NOT IN "
        "(SELECT device_id FROM rollout_devices WHERE rollout_id = ? AND wave = 0)",
        [RELEASES["scrambled"], started["id"]],
    )
    assert never[0]["n"] == 0  # the later waves never received it


# Where the coordinator dies, in the order a rollout reaches them (each restart carries on to the next one).
HEALTHY_CRASHES = [
    "rollout.start:decided",
    "rollout.start:in-transaction",
    "rollout.start:committed",
    "publish:sent",  # the canary's assignments sent, not yet marked published
    "rollout.advance:decided",
    "rollout.advance:in-transaction",
    "rollout.advance:committed",
    "publish:sent",  # wave 1's assignments
    "SIGKILL from outside while wave 2 bakes",
    "rollout.advance:committed",  # the second advance
    "rollout.completed:in-transaction",
]
BAD_CRASHES = [
    "rollout.start:committed",
    "rollout.rollback:decided",
    "rollout.rollback:in-transaction",
    "rollout.rollback:committed",
    "publish:sent",  # the rollback assignments
    "rollout.rolled_back:in-transaction",
]


def _advances(rig: Rig) -> int:
    return len(rig.store_query("SELECT id FROM rollout_decisions WHERE decision = 'advance'"))


def _gate_samples(rig: Rig, rollout_id: str | None = None) -> int:
    """How many times a coordinator has judged a rollout's gates (it records a sample when it does)."""
    sql = "SELECT count(*) AS n FROM rollout_gate_samples" + (" WHERE rollout_id = ?" if rollout_id else "")
    return int(rig.store_query(sql, [rollout_id] if rollout_id else [])[0]["n"])


def _crash_through(rig: Rig, points: list[str]) -> None:
    coordinator = rig.coordinator
    assert coordinator is not None
    advanced_meanwhile = False
    for point in points:
        if point.startswith("SIGKILL"):
            before, judged = _advances(rig), _gate_samples(rig)
            coordinator.env = {}
            coordinator.start()
            # Killed once the restarted coordinator has judged the baking wave (a gate sample is its mark).
            wait_for(
                lambda judged=judged: _gate_samples(rig) > judged,  # type: ignore[misc]
                60,
                0.05,
                what="the restarted coordinator to judge the wave",
            )
            coordinator.kill()
            # The wave may have been judged ready within that tick: then the advance the next crash point
            # waits for has happened already (and the outcome checks below still hold).
            advanced_meanwhile = _advances(rig) > before
            continue
        if advanced_meanwhile and point == "rollout.advance:committed":
            advanced_meanwhile = False
            continue
        coordinator.env = {ENV: point}
        coordinator.start(wait=False)
        proc = coordinator.proc
        assert proc is not None
        wait_for(lambda p=proc: p.poll() is not None, 90, 0.1, what=f"coordinator to die at {point}")  # type: ignore[misc]
        assert f"crash point {point} reached" in coordinator.log.read_text(), point
        coordinator.proc = None
    coordinator.env = {}
    coordinator.start()


def _one_assignment_each(rig: Rig, rollout_id: str, release: str) -> dict[str, int]:
    rows = rig.store_query(
        "SELECT device_id, count(*) AS n FROM assignments WHERE rollout_id = ? AND release_id = ? GROUP BY device_id",
        [rollout_id, release],
    )
    return {r["device_id"]: r["n"] for r in rows}


def test_coordinator_killed_at_seventeen_points_finishes_both_rollouts_correctly(rig: Rig) -> None:
    assert rig.coordinator is not None
    rig.coordinator.kill()  # the rollout is stored while no coordinator runs, so the first crash point is ahead
    healthy = rig.cli("rollout", "start", RELEASES["healthy"], "--fleet", rig.fleet_name, *FAST)["id"]
    _crash_through(rig, HEALTHY_CRASHES)
    status = rig.wait_phase(healthy, {"completed", "rolled_back", "paused"})
    assert [d for d in _decisions(status) if d != "waiting"] == ["created", "start", "advance", "advance", "completed"]
    assert set(_one_assignment_each(rig, healthy, RELEASES["healthy"]).values()) == {1}  # no wave issued twice
    assert len(_one_assignment_each(rig, healthy, RELEASES["healthy"])) == 12  # and none skipped
    rig.wait_running(RELEASES["healthy"], 12)

    rig.coordinator.kill()
    bad = rig.cli("rollout", "start", RELEASES["scrambled"], "--fleet", rig.fleet_name, *FAST)["id"]
    _crash_through(rig, BAD_CRASHES)
    status = rig.wait_phase(bad, {"completed", "rolled_back"})
    assert [d for d in _decisions(status) if d != "waiting"] == ["created", "start", "rollback", "rolled_back"]
    canary = _one_assignment_each(rig, bad, RELEASES["scrambled"])
    assert sorted(canary.values()) == [1, 1]
    assert _one_assignment_each(rig, bad, RELEASES["healthy"]) == {d: 1 for d in canary}  # one way back each
    rig.wait_running(RELEASES["healthy"], 12)
    for device in rig.store_query("SELECT id, running_release FROM devices"):
        current = rig.store_query(
            "SELECT release_id, published_at FROM assignments WHERE device_id = ? ORDER BY counter DESC LIMIT 1",
            [device["id"]],
        )[0]
        assert current["release_id"] == device["running_release"] and current["published_at"] is not None
    assert rig.cli("audit", "verify")["intact"]


def test_silent_devices_count_against_the_wave_and_get_the_rollback_when_they_return(rig: Rig) -> None:
    assert rig.fleet is not None
    rig.fleet.switch_off([0, 1, 2])  # a quarter of the fleet loses power
    wait_for(lambda: len(rig.store_query("SELECT id FROM devices WHERE online = 0")) == 3, 30, what="last wills")
    args = ["--canary", "12", "--waves", "1.0", "--bake", "1", "--min-samples", "150", "--silent-after", "3"]
    rollout = rig.cli("rollout", "start", RELEASES["healthy"], "--fleet", rig.fleet_name, *args)["id"]
    status = rig.wait_phase(rollout, {"rolling_back", "rolled_back", "completed"})
    rollback = next(d for d in status["decisions"] if d["decision"] == "rollback")
    silent = next(g for g in rollback["gates"] if g["metric"] == "silent_fraction")
    assert silent["verdict"] == "fail" and silent["value"] == pytest.approx(0.25)
    assert status["phase"] == "rolling_back"  # waiting for the three that are away
    rig.fleet.switch_on([0, 1, 2])
    status = rig.wait_phase(rollout, {"rolled_back"})
    rig.wait_running(RELEASES["base"], 12)


def test_thin_evidence_never_fires_and_operators_pause_and_roll_back(rig: Rig) -> None:
    args = ["--canary", "2", "--bake", "0.5", "--min-samples", "1000000", "--silent-after", "60"]
    rollout = rig.cli("rollout", "start", RELEASES["scrambled"], "--fleet", rig.fleet_name, *args)["id"]
    wait_for(lambda: rig.running(RELEASES["scrambled"]) == 2, 60, what="canary installed")
    judged = _gate_samples(rig, rollout)
    # Several judgements of the scrambled canary (a gate sample each), each with too few samples.
    wait_for(lambda: _gate_samples(rig, rollout) >= judged + 2, 60, 0.2, what="two more gate samples")
    status = rig.status(rollout)
    assert status["phase"] == "gating" and "rollback" not in _decisions(status)
    waiting = [d for d in status["decisions"] if d["decision"] == "waiting"]
    assert waiting and "too little data" in waiting[-1]["reason"]  # recorded, once per reason
    assert len({d["reason"] for d in waiting}) == len(waiting)
    assert {g["verdict"] for g in status["gates"] if g["metric"] == "class_mix_shift"} == {"insufficient"}

    # A second rollout over the same devices is refused, naming the first.
    with pytest.raises(AssertionError, match=f"in active rollout {rollout}"):
        rig.cli("rollout", "start", RELEASES["healthy"], "--fleet", rig.fleet_name)
    assert rig.cli("rollout", "pause", rollout)["phase"] == "paused"
    with pytest.raises(AssertionError, match="the rollout is paused; it cannot be paused"):
        rig.cli("rollout", "pause", rollout)
    assert rig.cli("rollout", "rollback", rollout)["phase"] == "rolling_back"
    rig.wait_phase(rollout, {"rolled_back"})
    rig.wait_running(RELEASES["base"], 12)
    with pytest.raises(AssertionError, match="nothing more can be done"):
        rig.cli("rollout", "pause", rollout)
    assert rig.cli("rollout", "status", rollout, "--follow")["phase"] == "rolled_back"  # ended: returns at once
    assert [r["phase"] for r in rig.cli("rollout", "list")] == ["rolled_back"]


def test_policy_refuses_releases_and_rollouts_naming_every_rule(rig: Rig, tmp_path: Path) -> None:
    (rig.datadir.root / "policy.toml").write_text(
        "[release]\nmax_epsilon = 8.0\nrequired_card_fields = ['intended_use']\n"
        "[rollout]\nmin_canary = 3\nrequired_gates = ['class_mix_shift']\n"
    )
    targets_before = sorted((rig.datadir.repository_dir / "targets").rglob("*"))
    model = tmp_path / "m.tflite"
    model.write_bytes(ModelFamily(seed=7).base())
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"privacy": {"epsilon": 12.0}}))
    with pytest.raises(
        AssertionError,
        match=r"required_card_fields: the model card has no 'intended_use'; max_epsilon: ε = 12.0 exceeds 8.0",
    ):
        rig.cli("release", str(model), "--name", "digits", "--version", "9.0.0", "--card", str(card))
    assert sorted((rig.datadir.repository_dir / "targets").rglob("*")) == targets_before  # nothing signed
    assert not rig.store_query("SELECT id FROM releases WHERE version = '9.0.0'")

    with pytest.raises(AssertionError, match=r"min_canary: .*required_gates: the rollout does not gate on class_mix"):
        rig.cli(
            "rollout",
            "start",
            RELEASES["healthy"],
            "--fleet",
            rig.fleet_name,
            "--canary",
            "1",
            "--gate",
            "score_psi<=0.2",
        )
    assert not rig.store_query("SELECT id FROM rollouts")
    assert rig.store_query("SELECT count(*) AS n FROM assignments WHERE release_id = ?", [RELEASES["healthy"]]) == [
        {"n": 0}
    ]
    refusals = rig.cli("audit", "list", "--action", "policy.refused")
    assert [r["subject"] for r in refusals] == [RELEASES["healthy"], "digits@9.0.0"]
    assert rig.cli("audit", "verify")["intact"]


def test_one_sites_sensor_drift_holds_the_rollout_naming_that_cohort_until_it_passes(rig: Rig) -> None:
    assert rig.fleet is not None and rig.fleet.workload is not None
    args = ["--canary", "3", "--canary-by", "site", "--waves", "1.0", "--bake", "1", "--min-samples", "200"]
    args += ["--on-fail", "hold", "--gate-window", "6", "--gate", "input_max_psi<=0.25"]
    rollout = rig.cli("rollout", "start", RELEASES["healthy"], "--fleet", rig.fleet_name, *args)["id"]
    canary = {r["device_id"] for r in rig.store_query("SELECT device_id FROM rollout_devices WHERE wave = 0")}
    sites = {r["labels"] for r in rig.store_query(f"SELECT labels FROM devices WHERE id IN {tuple(canary)}")}
    assert len(sites) == 3  # one canary device per site
    site0 = [a.config.device_id for a in rig.fleet.fleet.agents if a.config.labels["site"] == "site-0"]
    rig.fleet.workload.faults.update({d: SensorFault("contrast", 0.6) for d in site0})

    def held() -> dict[str, object] | None:
        rows = rig.store_query(
            "SELECT reason FROM rollout_decisions WHERE rollout_id = ? AND decision = 'hold' AND reason LIKE ?",
            [rollout, "%in cohort%"],
        )
        return rows[0] if rows else None

    hold = wait_for(held, 60, 0.2, what="a hold naming a cohort")
    assert "input_max_psi" in hold["reason"] and "in cohort site=site-0 (gate" in hold["reason"]
    assert rig.status(rollout)["phase"] == "gating"
    assert rig.store_query("SELECT count(*) AS n FROM rollout_devices WHERE counter IS NOT NULL") == [{"n": 3}]

    rig.fleet.workload.faults.clear()  # the site's sensors are fixed; fresh windows pass, the hold lifts
    status = rig.wait_phase(rollout, {"completed", "rolled_back"}, 90)
    assert status["phase"] == "completed"
    assert [d for d in _decisions(status) if d != "waiting"][-3:] == ["hold", "advance", "completed"]
