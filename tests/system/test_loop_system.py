"""The closed loop run by `fedfleet serve` on real parts: a coordinator process with its embedded broker, real
agents, Flower + Opacus on Ray, litert-torch, SQLite. The test only injects the sensor fault (through
simulations.closed_loop) and waits; every decision must come from the coordinator."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from server.store import Store
from simulations.closed_loop import ClosedLoopResult, run_closed_loop, verdict

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(900)]

SECRET = "loop-test-secret"


class Receiver:
    """A webhook receiver on loopback: keeps each body whose HMAC-SHA256 signature checks, refuses the rest."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.refused = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
                if hmac.compare_digest(self.headers.get("X-Fedfleet-Signature", ""), expected):
                    receiver.bodies.append(json.loads(body))
                    self.send_response(204)
                else:
                    receiver.refused += 1
                    self.send_response(401)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/fedfleet"

    def policy(self) -> str:
        return f'[[alerts.webhooks]]\nurl = "{self.url}"\nsecret = "{SECRET}"\n'


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def _loop(root: Path, **kwargs: Any) -> tuple[ClosedLoopResult, Store]:
    result = run_closed_loop(root, devices=6, rounds=2, progress=lambda _: None, timeout=200, **kwargs)
    assert verdict(result) == [], "\n".join(f"{t:6.1f} {s}" for t, s in result.timeline)
    return result, Store(root / "data" / "fedfleet.db")


def test_serve_closes_the_loop_through_kills_at_each_step_and_tells_a_webhook(
    tmp_path: Path, receiver: Receiver
) -> None:
    """One loop, the coordinator SIGKILLed after the alarm, during training and before the rollout starts (each
    time restarted): one training run, one release, one alarm, and every decision the coordinator's."""
    points = ["loop.alarm:raised", "loop.training:running", "loop.rollout:before-start"]
    result, store = _loop(tmp_path, webhooks=receiver.policy(), crash_points=points)
    try:
        audit = list(store.db.query("SELECT actor, action, subject, detail FROM audit ORDER BY seq"))
        loop_steps = [
            a["action"] for a in audit if a["action"].startswith(("drift.", "retrain.")) and a["actor"] == "coordinator"
        ]
        models = list(store.db.query("SELECT version, parent, lineage FROM models ORDER BY seq"))
        release = store.release("digits@2")
        runs = [r["status"] for r in store.db.query("SELECT status FROM fl_runs ORDER BY started_at")]
        releases = [r.id for r in store.releases()]
        alarms = list(store.db.query("SELECT id FROM drift_alarms"))
        jobs = list(store.db.query("SELECT state, release_id FROM retrain_jobs"))
        rollouts = [r["release_id"] for r in store.db.query("SELECT release_id FROM rollouts")]
    finally:
        store.close()
    assert result.coordinator_restarts == 3
    assert runs == ["completed", "completed"]  # the first model, and one retraining despite three kills
    assert releases == ["digits@1", "digits@2"] and rollouts == ["digits@2"]
    assert len(alarms) == 1 and jobs == [{"state": "completed", "release_id": "digits@2"}]
    assert loop_steps[:6] == [
        "drift.alarm",
        "retrain.decided",
        "retrain.training",
        "retrain.trained",
        "retrain.released",
        "retrain.rollout",
    ]
    # The alarm resolves once most devices run digits@2: before or after the rollout's last wave completes.
    assert sorted(loop_steps[6:]) == ["drift.resolved", "retrain.completed"]
    starts = [
        a for a in audit if a["action"] == "rollout.start" and json.loads(a["detail"]).get("release") == "digits@2"
    ]
    assert [a["actor"] for a in starts] == ["coordinator"]
    # Lineage names the cause, in the registry and in the signed release's model card.
    assert [m["version"] for m in models] == ["digits@1", "digits@2"] and models[1]["parent"] == "digits@1"
    cause = json.loads(models[1]["lineage"])["cause"]
    assert cause.startswith("retrained because input_max_psi ") and "on digits@1 in fleet" in cause
    assert result.alarm is not None and cause.endswith(f"alarm {result.alarm['id']}")
    assert release.custom["model_card"]["training"]["cause"] == cause
    # The drift alarm reached the webhook, signed, opened and then resolved (receivers dedupe on the delivery id:
    # a coordinator killed mid-POST sends it again).
    # Audit anchors go to the same webhook (it asks for every event); they are checked in test_audit_anchor.py.
    unique = {b["delivery"]: b for b in receiver.bodies if b["event"] != "audit.anchor"}.values()
    drift = [(b["event"], b["alert"]["state"]) for b in unique if b["alert"]["kind"] == "drift_alarm"]
    assert drift == [("alert.opened", "open"), ("alert.resolved", "resolved")] and receiver.refused == 0
    assert result.drift_after is not None and result.drift_after.value is not None and not result.drift_after.over
