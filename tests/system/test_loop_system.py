"""The closed loop run by `fedfleet serve` on real parts, through `fedfleet demo` (small): a coordinator process
with its embedded broker, real agents, Flower + Opacus on Ray, litert-torch, SQLite. The demo only injects the
sensor fault (simulations.closed_loop) and waits; every decision must come from the coordinator, also when it is
SIGKILLed at the loop's crash points. One loop proves both the command and the crash safety: each loop costs
minutes of training on Ray."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from server.datadir import DataDir
from server.store.dashboard import DashboardReads
from simulations.processes import descendants, run_bounded

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


def _run_or_dump_stacks(cmd: list[str], keep: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run the demo; if it overruns, have it and its coordinator print every thread's stack (SIGUSR1, see
    server.cli.main) and fail with those, so a hang says where it hung. Either way nothing is left running."""

    def dump_stacks(proc: subprocess.Popen[str]) -> None:
        for pid in [proc.pid, *descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        time.sleep(3)  # only on the way to failing: time for the stacks to be written

    try:
        return run_bounded(cmd, timeout, on_timeout=dump_stacks)
    except subprocess.TimeoutExpired as e:
        serve_log = keep / "data" / "serve.log"
        coordinator = serve_log.read_text()[-6000:] if serve_log.exists() else "(no serve.log)"
        pytest.fail(
            f"the demo ran past {timeout:.0f} s\n--- stdout\n{str(e.stdout)[-3000:]}\n--- stderr (stacks)\n"
            f"{str(e.stderr)[-12000:]}\n--- coordinator log (stacks)\n{coordinator}"
        )


def test_fedfleet_demo_closes_the_loop_through_kills_at_each_step_and_tells_a_webhook(
    tmp_path: Path, receiver: Receiver
) -> None:
    """`fedfleet demo` small: train, release, install, drift, alarm, retrain within budget, gated rollout, a
    report; the coordinator SIGKILLed after the alarm, during training and before the rollout starts (each time
    restarted): one training run, one release, one alarm, and every decision the coordinator's."""
    # Prepare
    keep, report, hooks = tmp_path / "keep", tmp_path / "report", tmp_path / "webhooks.toml"
    hooks.write_text(receiver.policy())
    points = ["loop.alarm:raised", "loop.training:running", "loop.rollout:before-start"]
    args = ["demo", "--devices", "6", "--rounds", "2", "--report", str(report), "--keep", str(keep)]
    args += ["--webhooks", str(hooks), *(a for p in points for a in ("--crash-at", p))]

    # Execute
    out = _run_or_dump_stacks([sys.executable, "-m", "simulations.cli", *args], keep, timeout=600)

    # Assert: the demo says the loop closed (simulations.closed_loop.verdict: alarm, completed job, every device
    # on the retrained release, drift back below the threshold, no telemetry lost, every device within budget)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert {p.name for p in report.iterdir()} >= {"summary.md", "accuracy-and-epsilon.png", "drift-over-time.png"}
    assert len(re.findall(r"coordinator killed at crash point '[^']+'; restarting it", out.stdout)) == 3
    assert re.search(r"drift on digits@2: input_max_psi [0-9.]+ <= 0\.25 on digits@2", out.stdout), out.stdout[-3000:]
    d = DataDir(keep / "data")
    token = d.operator_token()
    assert token in out.stdout  # told on the terminal, where the person running the demo reads it ...
    assert token not in (report / "summary.md").read_text()  # ... never in the report they may share
    store = d.store()
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
        rollouts = list(store.db.query("SELECT release_id, phase FROM rollouts"))
        running = {r["running_release"] for r in store.devices()}
        lifetime = DashboardReads(store).max_lifetime_epsilon()  # as the ledger counts it, reference queries too
    finally:
        store.close()
    assert runs == ["completed", "completed"]  # the first model, and one retraining despite three kills
    assert releases == ["digits@1", "digits@2"] and rollouts == [{"release_id": "digits@2", "phase": "completed"}]
    assert running == {"digits@2"}
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
    assert 0 < lifetime <= d.config().epsilon_budget  # two runs of target ε 3 each, within the budget of 10
    # Lineage names the cause, in the registry and in the signed release's model card.
    assert [m["version"] for m in models] == ["digits@1", "digits@2"] and models[1]["parent"] == "digits@1"
    cause = json.loads(models[1]["lineage"])["cause"]
    assert cause.startswith("retrained because input_max_psi ") and "on digits@1 in fleet" in cause
    assert cause.endswith(f"alarm {alarms[0]['id']}")
    assert release.custom["model_card"]["training"]["cause"] == cause
    # The drift alarm reached the webhook, signed, opened and then resolved (receivers dedupe on the delivery id:
    # a coordinator killed mid-POST sends it again).
    # Audit anchors go to the same webhook (it asks for every event); they are checked in test_audit_anchor.py.
    unique = {b["delivery"]: b for b in receiver.bodies if b["event"] != "audit.anchor"}.values()
    drift = [(b["event"], b["alert"]["state"]) for b in unique if b["alert"]["kind"] == "drift_alarm"]
    assert drift == [("alert.opened", "open"), ("alert.resolved", "resolved")] and receiver.refused == 0
