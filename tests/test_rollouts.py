"""Rollouts end to end: real Mosquitto, the coordinator as a process (`fedfleet serve`), real agents inferring,
the `fedfleet rollout` CLI. Outcomes are read from the coordinator's database, never from log text."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from simulations.rig import RELEASES, Rig
from tests.support import Mosquitto

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
    started = rig.cli("rollout", "start", RELEASES["healthy"], "--fleet", "lab", *FAST)
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
    started = rig.cli("rollout", "start", RELEASES["scrambled"], "--fleet", "lab", *FAST)
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
