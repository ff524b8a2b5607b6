"""The closed loop's parts on real SQLite files, a real HTTP server on loopback and the real CLI: drift alarms with
a life (one per sustained drift, resolved when it goes, a cool-down), the policy's decisions, proposals a person
approves or rejects, alerts, and signed webhook deliveries that a failing or hanging endpoint cannot hold up."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.contract.drift import DriftReference, WindowCounts
from edge_agent.contract.windows import ClosedWindow, window_to_proto
from server import audit
from server.datadir import DataDir
from server.ingest.telemetry import ingest_window
from server.loop.alerts import SIGNATURE_HEADER, Alerts, WebhookSender
from server.loop.drift_watch import DriftWatch, read_fleet_drift
from server.loop.kinds import AlertKind
from server.loop.retrain import JobState, RetrainController, job_lock_path
from server.policy import Policy, PolicyError, Webhook, load_policy
from server.store import Store
from server.store.loop import AlarmRecords, AlertRecords, DeliveryRecords, JobRecords
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers
from tests.support import fedfleet, wait_for

FEATURES, CLASSES = 64, 10
RELEASE = "digits@1.0.0"
DEVICES = [f"pi-{i}" for i in range(4)]
T0 = 1_800_000_000_000  # a fixed clock for windows and ticks (ms)


def reference() -> DriftReference:
    return DriftReference.from_samples(np.random.default_rng(0).random((4000, FEATURES)), CLASSES)


class Telemetry:
    """Windows from the fleet's devices, as their agents would send them, stored through the real ingest path."""

    def __init__(self, store: Store, devices: list[str] = DEVICES) -> None:
        self.store = store
        self.ref = reference()
        self.sequence = dict.fromkeys(devices, 0)
        self.rng = np.random.default_rng(7)

    def send(self, end_ms: int, contrast: float = 1.0, n: int = 150) -> None:
        """One window per device ending at `end_ms`; inputs squeezed towards 0.5 by `contrast` < 1 (a fault)."""
        for device in self.sequence:
            counts = WindowCounts.empty(self.ref)
            x = 0.5 + (self.rng.random((n, FEATURES)) - 0.5) * contrast
            logits = self.rng.normal(0, 1, (n, CLASSES))
            probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            counts.add(self.ref, x, probs, self.rng.exponential(2.0, n))
            self.sequence[device] += 1
            window = ClosedWindow(RELEASE, end_ms - 1000, end_ms, counts)
            ingest_window(self.store, window_to_proto(window, device, self.sequence[device]), device, "mqtt")


@pytest.fixture
def fleet(datadir: DataDir) -> Iterator[tuple[DataDir, Store, Telemetry]]:
    store = datadir.store()
    model = build_dense_model(random_dense_layers([FEATURES, 16, CLASSES], 1))
    publish_release(
        datadir.repository(), store, model, "digits", "1.0.0", extra={"drift_reference": reference().to_metadata()}
    )
    for device in DEVICES:
        store.register_device(device, "home", {}, {}, "test")
        store.set_status(device, True, RELEASE, "", 1, "", "")
    yield datadir, store, Telemetry(store)
    store.close()


def policy(**changes: Any) -> Policy:
    base = Policy(
        retrain_on_drift="alert", retrain_window_seconds=5, retrain_min_devices=2, retrain_cooldown_seconds=60
    )
    return dataclasses.replace(base, **changes)


def decide_alert_only(alarm_id: int, reading: Any) -> str:
    return "alert only"


def test_a_healthy_fleet_raises_no_alarm(fleet: tuple[DataDir, Store, Telemetry]) -> None:
    _, store, telemetry = fleet
    watch = DriftWatch(store, Alerts(store), decide_alert_only)
    for k in range(10):  # ten readings of fresh, healthy windows (fixed seed)
        telemetry.send(T0 + k * 6000)
        assert watch.tick(policy(), T0 + k * 6000) == []
    reading = read_fleet_drift(store, "home", policy(), T0 + 54_000)
    assert reading is not None and reading.value is not None and not reading.over  # judged, and healthy
    assert AlarmRecords(store).recent() == [] and AlertRecords(store).recent() == []


def test_too_little_evidence_gives_no_verdict(fleet: tuple[DataDir, Store, Telemetry]) -> None:
    _, store, telemetry = fleet
    telemetry.send(T0, contrast=0.2, n=20)  # drifted, but 80 samples for 10 bins a feature
    reading = read_fleet_drift(store, "home", policy(), T0)
    assert reading is not None and reading.value is None and not reading.over
    assert reading.needed_samples == 300 and reading.samples == 80
    assert "not judged" in reading.describe()
    assert DriftWatch(store, Alerts(store), decide_alert_only).tick(policy(), T0) == []


def test_sustained_drift_raises_one_alarm_which_resolves_when_drift_goes(
    fleet: tuple[DataDir, Store, Telemetry],
) -> None:
    _, store, telemetry = fleet
    watch = DriftWatch(store, Alerts(store), decide_alert_only)
    telemetry.send(T0)
    assert watch.tick(policy(), T0) == []
    opened: list[int] = []
    for k in range(1, 6):  # the sensors lose contrast and stay so for five readings
        telemetry.send(T0 + k * 6000, contrast=0.3)
        opened += watch.tick(policy(), T0 + k * 6000)
    assert len(opened) == 1
    (alarm,) = AlarmRecords(store).open_alarms("home")
    assert alarm["state"] == "open" and alarm["value"] > 0.25 and alarm["peak"] >= alarm["value"]
    assert [a["kind"] for a in AlertRecords(store).recent("open")] == [AlertKind.DRIFT_ALARM]
    assert len(audit.entries(store, action="drift.alarm")) == 1

    telemetry.send(T0 + 36_000)  # the fault is fixed
    assert watch.tick(policy(), T0 + 36_000) == []
    assert AlarmRecords(store).open_alarms() == []
    resolved = AlarmRecords(store).get(opened[0])
    assert resolved["state"] == "resolved" and resolved["resolution"].startswith("drift fell back")
    assert [a["state"] for a in AlertRecords(store).recent()] == ["resolved"]
    assert len(audit.entries(store, action="drift.resolved")) == 1

    telemetry.send(T0 + 42_000, contrast=0.3)  # drift again within the cool-down: no new alarm
    assert watch.tick(policy(), T0 + 42_000) == []
    telemetry.send(T0 + 100_000, contrast=0.3)  # after it: a second alarm
    assert len(watch.tick(policy(), T0 + 100_000)) == 1
    assert len(AlarmRecords(store).recent()) == 2


def test_an_alarm_resolves_when_the_fleet_moves_to_another_release(fleet: tuple[DataDir, Store, Telemetry]) -> None:
    _, store, telemetry = fleet
    watch = DriftWatch(store, Alerts(store), decide_alert_only)
    telemetry.send(T0, contrast=0.3)
    (alarm_id,) = watch.tick(policy(), T0)
    for device in DEVICES:
        store.set_status(device, True, "digits@2.0.0", "", 2, "", "")
    watch.tick(policy(), T0 + 1000)
    assert "no longer runs" in AlarmRecords(store).get(alarm_id)["resolution"]


def test_on_drift_off_watches_nothing(fleet: tuple[DataDir, Store, Telemetry]) -> None:
    _, store, telemetry = fleet
    telemetry.send(T0, contrast=0.3)
    assert DriftWatch(store, Alerts(store), decide_alert_only).tick(policy(retrain_on_drift="off"), T0) == []


def _controller(d: DataDir, store: Store, p: Policy) -> tuple[RetrainController, DriftWatch]:
    alerts = Alerts(store, p.webhooks)
    retrain = RetrainController(d, store, alerts, d.rollouts(store), p)
    return retrain, DriftWatch(store, alerts, retrain.decide)


def test_review_proposes_and_nothing_trains_until_a_person_approves(fleet: tuple[DataDir, Store, Telemetry]) -> None:
    d, store, telemetry = fleet
    p = policy(retrain_on_drift="review")
    retrain, watch = _controller(d, store, p)
    telemetry.send(T0, contrast=0.3)
    (alarm_id,) = watch.tick(p, T0)
    (job,) = JobRecords(store).recent()
    assert (job["state"], job["alarm_id"], job["from_release"]) == (JobState.PROPOSED, alarm_id, RELEASE)
    assert job["cause"].startswith("retrained because input_max_psi ") and f"alarm {alarm_id}" in job["cause"]
    kinds = sorted(a["kind"] for a in AlertRecords(store).recent("open"))
    assert kinds == [AlertKind.DRIFT_ALARM, AlertKind.RETRAIN_PROPOSED]
    retrain.tick()
    assert not job_lock_path(d, job["id"]).parent.exists()  # no worker was started for a proposal

    rejected = fedfleet(d, "loop", "reject", str(job["id"]), "--json")
    assert rejected.returncode == 0, rejected.stderr
    assert json.loads(rejected.stdout)["state"] == JobState.REJECTED
    again = fedfleet(d, "loop", "approve", str(job["id"]))
    assert again.returncode == 1 and "not proposed" in again.stderr  # a decided job cannot be decided again
    assert JobRecords(store).get(job["id"])["state"] == JobState.REJECTED
    assert [a["kind"] for a in AlertRecords(store).recent("open")] == [AlertKind.DRIFT_ALARM]
    retrain.tick()
    assert not job_lock_path(d, job["id"]).parent.exists()
    assert fedfleet(d, "loop", "approve", "99").returncode == 1  # no such job: a clear error, nothing changes
    entries = [e["action"] for e in audit.entries(store)]
    assert "retrain.proposed" in entries and "retrain.rejected" in entries and "retrain.approved" not in entries


def test_an_approved_proposal_becomes_a_job_for_the_worker(fleet: tuple[DataDir, Store, Telemetry]) -> None:
    d, store, telemetry = fleet
    p = policy(retrain_on_drift="review")
    _, watch = _controller(d, store, p)
    telemetry.send(T0, contrast=0.3)
    watch.tick(p, T0)
    (job,) = JobRecords(store).recent()
    approved = fedfleet(d, "loop", "approve", str(job["id"]), "--json")
    assert approved.returncode == 0, approved.stderr
    doc = json.loads(approved.stdout)
    assert (doc["state"], doc["decided_by"]) == (JobState.APPROVED, "cli")
    assert AlertRecords(store).recent("open")[0]["kind"] == AlertKind.DRIFT_ALARM  # the proposal alert resolved
    status = json.loads(fedfleet(d, "loop", "status", "--json").stdout)
    assert [j["state"] for j in status["jobs"]] == ["approved"] and status["alarms"][0]["state"] == "open"


def test_one_retraining_at_a_time_per_fleet(fleet: tuple[DataDir, Store, Telemetry]) -> None:
    d, store, telemetry = fleet
    p = policy(retrain_on_drift="review", retrain_cooldown_seconds=0)
    _, watch = _controller(d, store, p)
    telemetry.send(T0, contrast=0.3)
    watch.tick(p, T0)
    telemetry.send(T0 + 6000)  # resolves
    watch.tick(p, T0 + 6000)
    telemetry.send(T0 + 12_000, contrast=0.3)  # a second alarm while the first proposal is still open
    assert len(watch.tick(p, T0 + 12_000)) == 1
    assert len(JobRecords(store).recent()) == 1
    decisions = [e["detail"]["decision"] for e in audit.entries(store, action="retrain.proposed")]
    assert decisions[0].startswith("no new retraining: job 1")


def test_alerts_cli_lists_and_acknowledges(fleet: tuple[DataDir, Store, Telemetry]) -> None:
    d, store, _ = fleet
    alerts = Alerts(store)
    first = alerts.raise_alert(AlertKind.DEVICES_SILENT, "home", "silent:home", "2 devices silent")
    assert first is not None
    assert alerts.raise_alert(AlertKind.DEVICES_SILENT, "home", "silent:home", "3 devices silent") is None
    listed = json.loads(fedfleet(d, "alerts", "list", "--json").stdout)
    assert [(a["id"], a["state"], a["summary"]) for a in listed] == [(first, "open", "2 devices silent")]
    acked = fedfleet(d, "alerts", "ack", str(first), "--json")
    assert acked.returncode == 0 and json.loads(acked.stdout)["state"] == "acknowledged"
    assert json.loads(fedfleet(d, "alerts", "list", "--state", "open", "--json").stdout) == []
    missing = fedfleet(d, "alerts", "ack", "42")
    assert missing.returncode == 1 and "no alert 42" in missing.stderr
    assert alerts.resolve("silent:home", "heard again") == first  # an acknowledged alert still resolves
    assert AlertRecords(store).get(first)["state"] == "resolved"


# ----- webhooks -----


class Endpoint:
    """A real HTTP server on loopback that checks each delivery's signature. `fail_first` answers 500 that many
    times; `hang` holds every request until released."""

    def __init__(self, secret: str, fail_first: int = 0, hang: bool = False) -> None:
        self.secret = secret
        self.fail_first = fail_first
        self.received: list[dict[str, Any]] = []
        self.attempts = 0
        self.release = threading.Event()
        if not hang:
            self.release.set()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                endpoint.release.wait(30)
                endpoint.attempts += 1
                expected = "sha256=" + hmac.new(endpoint.secret.encode(), body, hashlib.sha256).hexdigest()
                if not hmac.compare_digest(self.headers.get(SIGNATURE_HEADER, ""), expected):
                    self.send_response(401)
                elif endpoint.attempts <= endpoint.fail_first:
                    self.send_response(500)
                else:
                    endpoint.received.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # shutdown() waits for serve_forever to next check its flag: poll often, not every half second
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoints() -> Iterator[list[Endpoint]]:
    made: list[Endpoint] = []
    yield made
    for e in made:
        e.stop()


def test_webhooks_are_signed_retried_and_recorded_and_a_hanging_one_holds_up_nothing(
    datadir: DataDir, endpoints: list[Endpoint]
) -> None:
    good = Endpoint("s3cret")
    flaky = Endpoint("other", fail_first=2)
    hanging = Endpoint("h", hang=True)
    wrong = Endpoint("not-the-secret")  # answers 401: the coordinator signs with another key
    endpoints += [good, flaky, hanging, wrong]
    hooks = (
        Webhook(good.url, "s3cret"),
        Webhook(flaky.url, "other", events=(str(AlertKind.DRIFT_ALARM),)),
        Webhook(hanging.url, "h"),
        Webhook(wrong.url, "s3cret", max_attempts=2),
    )
    store = datadir.store()
    sender = WebhookSender(datadir.store, hooks, timeout=20, backoff_seconds=0.05).start()
    try:
        alerts = Alerts(store, hooks)
        drift = alerts.raise_alert(AlertKind.DRIFT_ALARM, "home", "drift:home:x", "drift on home")
        silent = alerts.raise_alert(AlertKind.DEVICES_SILENT, "home", "silent:home", "silent")
        assert alerts.resolve("silent:home", "heard again") == silent
        # The hanging endpoint holds its deliveries; every other endpoint gets its own meanwhile.
        wait_for(lambda: len(good.received) == 3, 20, what="three deliveries to the good endpoint")
        wait_for(lambda: len(flaky.received) == 1, 20, what="the flaky endpoint's delivery after two 500s")
        deliveries = DeliveryRecords(store)
        wait_for(lambda: dict(deliveries.counts()).get("failed") == 3, 20, what="the wrong-secret deliveries given up")
        assert not hanging.received and hanging.attempts == 0
        assert [(b["event"], b["alert"]["id"]) for b in good.received] == [
            ("alert.opened", drift),
            ("alert.opened", silent),
            ("alert.resolved", silent),
        ]
        assert good.received[2]["alert"]["state"] == "resolved"
        (flaky_row,) = [r for r in deliveries.recent() if r["url"] == flaky.url]
        assert (flaky_row["state"], flaky_row["attempts"], flaky_row["last_result"]) == ("delivered", 3, "HTTP 204")
        wrong_rows = [r for r in deliveries.recent() if r["url"] == wrong.url]
        assert {(r["state"], r["attempts"], r["last_result"]) for r in wrong_rows} == {("failed", 2, "HTTP 401")}
        hanging.release.set()
        wait_for(lambda: len(hanging.received) == 3, 20, what="the hanging endpoint's deliveries once it answers")
        # Its last delivery is recorded once the answer is back: received is not yet recorded.
        wait_for(lambda: "pending" not in dict(deliveries.counts()), 20, what="every delivery recorded")
        assert dict(deliveries.counts()) == {"delivered": 7, "failed": 3}
    finally:
        sender.stop()
        store.close()


def test_deliveries_queued_before_a_restart_are_delivered_after_it(datadir: DataDir, endpoints: list[Endpoint]) -> None:
    good = Endpoint("k")
    endpoints.append(good)
    hooks = (Webhook(good.url, "k"),)
    store = datadir.store()
    try:
        Alerts(store, hooks).raise_alert(AlertKind.TRAINING_FAILED, "home", "retrain:1:failed", "it failed")
        assert DeliveryRecords(store).pending_count() == 1  # queued with the alert, in its transaction
        sender = WebhookSender(datadir.store, hooks, backoff_seconds=0.05).start()  # a coordinator starting later
        try:
            wait_for(lambda: len(good.received) == 1, 20, what="the queued delivery")
        finally:
            sender.stop()
        Alerts(store, hooks).raise_alert(AlertKind.TRAINING_FAILED, "home", "retrain:2:failed", "it failed again")
        sender = WebhookSender(datadir.store, (), backoff_seconds=0.05).start()  # the policy dropped the endpoint
        try:
            wait_for(lambda: DeliveryRecords(store).pending_count() == 0, 20, what="the orphaned delivery closed")
        finally:
            sender.stop()
        orphan = DeliveryRecords(store).recent()[0]
        assert (orphan["state"], orphan["last_result"]) == ("failed", "the webhook is no longer in the policy")
        assert len(good.received) == 1
    finally:
        store.close()


def test_a_full_webhook_queue_drops_the_oldest_and_says_so(datadir: DataDir, endpoints: list[Endpoint]) -> None:
    hanging = Endpoint("h", hang=True)
    endpoints.append(hanging)
    hooks = (Webhook(hanging.url, "h"),)
    store = datadir.store()
    sender = WebhookSender(datadir.store, hooks, timeout=20, max_pending=3, workers=1)
    try:
        alerts = Alerts(store, hooks)
        for k in range(6):
            alerts.raise_alert(AlertKind.DEVICES_SILENT, f"f{k}", f"silent:f{k}", "silent")
        sender.start()
        wait_for(lambda: sender.dropped == 3, 20, what="three dropped deliveries")
        states = {r["alert_id"]: r["state"] for r in DeliveryRecords(store).recent()}
        assert [states[a] for a in sorted(states)][:3] == ["dropped"] * 3
        hanging.release.set()
        wait_for(lambda: len(hanging.received) == 3, 20, what="the three kept deliveries")
        assert sorted(b["alert"]["subject"] for b in hanging.received) == ["f3", "f4", "f5"]
    finally:
        sender.stop()
        store.close()


# ----- policy -----


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[alerts.webhooks]]\nurl = "http://hooks.example.org/x"\nsecret = "k"', "only over https"),
        ('[[alerts.webhooks]]\nurl = "https://hooks.example.org/x"', "exactly one of secret and secret_env"),
        ('[[alerts.webhooks]]\nurl = "ftp://x/y"\nsecret = "k"', "must be an http(s) URL"),
        ('[[alerts.webhooks]]\nurl = "https://h/x"\nsecret = "k"\nevents = ["nope"]', "events must be a list"),
        ('[[alerts.webhooks]]\nurl = "https://h/x"\nsecret_env = "FEDFLEET_TEST_UNSET_SECRET"', "secret is empty"),
        ('[[alerts.webhooks]]\nurl = "https://h/x"\nsecret = "k"\nmax_attempts = 0', "max_attempts"),
        ('[retrain]\non_drift = "sometimes"', "retrain.on_drift must be one of"),
        ('[retrain]\nengine = "ray"', "retrain.engine must be one of simulation, deployment"),
        ('[retrain]\nengine = "deployment"', "needs retrain.superlink"),
        ('[retrain]\nengine = "deployment"\nsuperlink = "10.1.2.3:9093"', "not on loopback"),
        ("[retrain]\nclients = -2", "retrain.clients"),
        ("[retrain]\nmin_samples_per_bin = 0", "min_samples_per_bin"),
        ("[retrain]\nthreshold = -1", "retrain.threshold"),
        ("[alerts]\nprivacy_budget_fraction = 1.5", "privacy_budget_fraction"),
        ("[alerts]\nwebhook = []", "unknown setting alerts.webhook"),
    ],
)
def test_bad_loop_policy_is_refused_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_policy(path)


def test_loop_policy_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDFLEET_TEST_SECRET", "from-env")
    path = tmp_path / "policy.toml"
    path.write_text(
        '[retrain]\non_drift = "review"\nmin_samples_per_bin = 40\ncooldown_seconds = 5\n'
        '[[alerts.webhooks]]\nurl = "http://127.0.0.1:9/x"\nsecret_env = "FEDFLEET_TEST_SECRET"\n'
        'events = ["drift_alarm"]\n'
        '[[alerts.webhooks]]\nurl = "https://hooks.example.org/x"\nsecret = "inline"\n'
    )
    p = load_policy(path)
    assert (p.retrain_on_drift, p.retrain_min_samples_per_bin, p.retrain_cooldown_seconds) == ("review", 40, 5.0)
    assert [(h.url, h.secret, h.events) for h in p.webhooks] == [
        ("http://127.0.0.1:9/x", "from-env", ("drift_alarm",)),
        ("https://hooks.example.org/x", "inline", ()),
    ]
    assert "inline" not in repr(p.webhooks[1])  # secrets stay out of logs
    assert p.webhooks[0].wants("drift_alarm") and not p.webhooks[0].wants("devices_silent")
    path.write_text('[retrain]\nengine = "deployment"\nsuperlink = "[::1]:9093"\n')
    assert (load_policy(path).retrain_engine, load_policy(path).retrain_clients) == ("deployment", 0)
    path.write_text(
        '[retrain]\nengine = "deployment"\nsuperlink = "link.example.org:9093"\n'
        'superlink_root_certificates = "/etc/fedfleet/superlink-ca.pem"\nclients = 40\n'
    )
    assert load_policy(path).retrain_clients == 40


# ----- the dashboard's API and /metrics -----


def test_dashboard_api_shows_the_loop_and_takes_answers_only_from_an_operator(
    fleet: tuple[DataDir, Store, Telemetry],
) -> None:
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from server.dashboard.api import DashboardOptions, create_app

    d, store, telemetry = fleet
    p = policy(retrain_on_drift="review")
    _, watch = _controller(d, store, p)
    telemetry.send(T0, contrast=0.3)
    (alarm_id,) = watch.tick(p, T0)
    (job,) = JobRecords(store).recent()
    auth = {"Authorization": f"Bearer {d.operator_token()}"}
    with TestClient(create_app(d, DashboardOptions(d.operator_token()))) as c:
        assert c.get("/api/alerts").status_code == 401  # reads need the token too (public_read is off)
        alerts = c.get("/api/alerts", headers=auth).json()
        assert sorted(a["kind"] for a in alerts) == [AlertKind.DRIFT_ALARM, AlertKind.RETRAIN_PROPOSED]
        loop = c.get("/api/loop", headers=auth).json()
        assert [a["id"] for a in loop["alarms"]] == [alarm_id] and loop["jobs"][0]["state"] == "proposed"
        assert c.post(f"/api/loop/{job['id']}/approve").status_code == 401
        assert c.post(f"/api/loop/{job['id']}/retrain", headers=auth).status_code == 422
        assert JobRecords(store).get(job["id"])["state"] == JobState.PROPOSED  # refused requests changed nothing
        approved = c.post(f"/api/loop/{job['id']}/approve", headers=auth)
        assert approved.status_code == 200 and approved.json()["state"] == "approved"
        assert c.post(f"/api/loop/{job['id']}/reject", headers=auth).status_code == 409  # decided already
        drift_alert = next(a for a in alerts if a["kind"] == AlertKind.DRIFT_ALARM)
        acked = c.post(f"/api/alerts/{drift_alert['id']}/ack", headers=auth).json()
        assert acked["state"] == "acknowledged" and acked["acknowledged_by"]
        assert c.post("/api/alerts/999/ack", headers=auth).status_code == 404
        text = c.get("/metrics", headers=auth).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    alerts_now = {(s.labels["kind"], s.labels["state"]): s.value for s in families["fedfleet_alerts"].samples}
    assert alerts_now == {("drift_alarm", "acknowledged"): 1, ("retrain_proposed", "resolved"): 1}
    assert [s.value for s in families["fedfleet_drift_alarms_open"].samples] == [1]
    assert {s.labels["state"]: s.value for s in families["fedfleet_retrain_jobs"].samples} == {"approved": 1}


# ----- retraining that fails -----


def _approved_job(d: DataDir, store: Store, telemetry: Telemetry, **changes: Any) -> dict[str, Any]:
    p = policy(retrain_on_drift="retrain", **changes)
    _, watch = _controller(d, store, p)
    telemetry.send(T0, contrast=0.3)
    watch.tick(p, T0)
    (job,) = JobRecords(store).recent()
    assert job["state"] == JobState.APPROVED
    return job


@pytest.mark.slow
def test_a_training_that_fails_alerts_and_releases_nothing(fleet: tuple[DataDir, Store, Telemetry]) -> None:
    d, store, telemetry = fleet
    (d.root / "policy.toml").write_text('[retrain]\non_drift = "retrain"\ndata_source = "no_such_module:data"\n')
    job = _approved_job(d, store, telemetry)
    worker = subprocess.run(
        [sys.executable, "-m", "server.loop.worker", "--data-dir", str(d.root), str(job["id"])],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert worker.returncode == 0, worker.stderr
    failed = JobRecords(store).get(job["id"])
    assert failed["state"] == JobState.FAILED and "no_such_module" in failed["error"]
    alerts = [a for a in AlertRecords(store).recent("open") if a["kind"] == AlertKind.TRAINING_FAILED]
    assert len(alerts) == 1 and "no_such_module" in alerts[0]["summary"]
    assert [r.id for r in store.releases()] == [RELEASE]  # nothing released
    assert [e["action"] for e in audit.entries(store, action="retrain.failed")] == ["retrain.failed"]


def test_a_job_whose_worker_died_mid_training_fails_instead_of_training_again(
    fleet: tuple[DataDir, Store, Telemetry],
) -> None:
    d, store, telemetry = fleet
    job = _approved_job(d, store, telemetry)
    JobRecords(store).update(job["id"], JobState.APPROVED, state=str(JobState.TRAINING))  # as a worker would
    retrain, _ = _controller(d, store, policy(retrain_on_drift="retrain"))
    retrain.tick()  # no worker holds the job's lock: its run is lost
    failed = JobRecords(store).get(job["id"])
    assert failed["state"] == JobState.FAILED and "ended before it recorded a model" in failed["error"]
    assert retrain.running_workers() == {}  # and none was started to train it again
    assert not job_lock_path(d, job["id"]).exists()


def test_a_second_worker_for_the_same_job_leaves_it_alone(fleet: tuple[DataDir, Store, Telemetry]) -> None:
    import fcntl

    from server.loop.worker import run_job

    d, store, telemetry = fleet
    job = _approved_job(d, store, telemetry)
    lock = job_lock_path(d, job["id"])
    lock.parent.mkdir(mode=0o700, exist_ok=True)
    with lock.open("a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a first worker holds the job
        assert run_job(d, job["id"]) == "busy"
    assert JobRecords(store).get(job["id"])["state"] == JobState.APPROVED
