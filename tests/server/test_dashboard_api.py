"""The dashboard's HTTP API and /metrics over a real coordinator store: signed releases, devices with events and
telemetry, a rollout driven by the real engine, and (for the training, privacy and model views, marked `ray`) a
real Flower + Opacus training run. Every endpoint is called with and without the token and with bad input; a
refused request changes nothing. /metrics is read by prometheus-client's own text parser and compared with the
store. The live feed is read from a real uvicorn server on a free port. Tests that act (pause, resume, edits)
work on a copy of the module's data directory, so no test sees another's changes."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.contract.windows import window_to_proto
from server.dashboard import views
from server.dashboard.api import COOKIE, DashboardOptions, create_app
from server.datadir import DataDir
from server.fl.plan import TrainPlan
from server.fl.registry import Ledger
from server.fl.training import run_training
from server.ingest.events import EventRejected
from server.ingest.telemetry import REJECTED, ingest_windows
from server.rollout.spec import RolloutSpec
from server.store import Store, now_ms
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers
from tests.agent.test_telemetry import digits_reference, window
from tests.support import AppServer

DEVICES = [f"pi-{i}" for i in range(6)]


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DataDir, str]]:
    """A data directory with one of everything the dashboard shows but training; yields it with its rollout's
    id. Read-only for the tests: one that changes it takes a copy (`_copy`)."""
    d, _ = DataDir.init(tmp_path_factory.mktemp("dash") / "data")
    store = d.store()
    ref = digits_reference()
    for version, seed in (("1.0.0", 1), ("2.0.0", 2)):
        publish_release(
            d.repository(),
            store,
            build_dense_model(random_dense_layers([64, 16, 10], seed)),
            "digits",
            version,
            extra={"drift_reference": ref.to_metadata()},
        )
    for i, device in enumerate(DEVICES):
        store.register_device(device, "lab", {"site": f"site-{i % 2}"}, {"model": "pi4"}, "0.1")
        store.set_status(device, i < 5, "digits@1.0.0", "t", 1, "idle" if i else "failed", "" if i else "probe crashed")
        store.record_events(
            [
                {
                    "device_id": device,
                    "counter": 1,
                    "release_id": "digits@1.0.0",
                    "target_path": "t",
                    "kind": kind,
                    "reason": "",
                    "detail": "",
                    "device_time": now_ms(),
                }
                for kind in ("downloading", "installed", "committed")
            ],
            via="mqtt",
        )
        now = now_ms()
        for seq in (1, 2):
            w = window(ref, 400, seq + 10 * i)
            w = type(w)(w.release_id, now - 60_000 + seq * 1000, now - 59_000 + seq * 1000, w.counts)
            ingest_windows(store, [(window_to_proto(w, device, seq, seq), device)], via="mqtt")
    d.director().assign(store, DEVICES, store.release("digits@1.0.0"))
    rollouts = d.rollouts(store)
    rollout_id = rollouts.start(RolloutSpec("digits@2.0.0", fleet="lab", canary=2, bake_seconds=600, min_samples=10))
    rollouts.tick()  # pending → baking: the canary is assigned
    rollouts.tick(now_ms() + 3000)  # a gate sample while it bakes
    store.close()
    yield d, rollout_id


def _copy(d: DataDir, tmp_path: Path) -> DataDir:
    """A copy of the module's data directory, for a test that changes it."""
    shutil.copytree(d.root, tmp_path / "copy")
    return DataDir(tmp_path / "copy")


@pytest.fixture(scope="module")
def trained(coordinator: tuple[DataDir, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[DataDir, str]:
    """The module's data directory plus a real Flower + Opacus training run (Ray), in a copy of its own."""
    d, rollout_id = coordinator
    copy = _copy(d, tmp_path_factory.mktemp("dash-trained"))
    run_training(copy.root, TrainPlan(rounds=2, clients=2, noise_multiplier=1.0, seed=1))
    return copy, rollout_id


@pytest.fixture
def client(coordinator: tuple[DataDir, str]) -> Iterator[TestClient]:
    d, _ = coordinator
    with TestClient(create_app(d, DashboardOptions(d.operator_token()))) as c:
        yield c


@pytest.fixture
def trained_client(trained: tuple[DataDir, str]) -> Iterator[TestClient]:
    d, _ = trained
    with TestClient(create_app(d, DashboardOptions(d.operator_token()))) as c:
        yield c


def _auth(d: DataDir) -> dict[str, str]:
    return {"Authorization": f"Bearer {d.operator_token()}"}


def _phase(d: DataDir, rollout_id: str) -> str:
    store = d.store()
    try:
        return str(store.db.execute("SELECT phase FROM rollouts WHERE id = ?", [rollout_id]).fetchone()[0])
    finally:
        store.close()


def _reads(rollout_id: str, run_id: str) -> list[str]:
    return [
        "/api/fleet",
        "/api/devices/pi-1",
        "/api/rollouts",
        f"/api/rollouts/{rollout_id}",
        "/api/drift",
        "/api/training",
        f"/api/training/{run_id}",
        "/api/privacy",
        "/api/models",
        "/api/models/digits@1",
        "/api/audit",
        "/metrics",
    ]


def _run_id(client: TestClient, d: DataDir) -> str:
    return str(client.get("/api/training", headers=_auth(d)).json()[0]["id"])


@pytest.mark.slow
@pytest.mark.ray
def test_every_read_needs_the_token_unless_reads_are_opened(
    trained_client: TestClient, trained: tuple[DataDir, str]
) -> None:
    client = trained_client
    d, rollout_id = trained
    reads = _reads(rollout_id, _run_id(client, d))
    for path in reads:
        assert client.get(path, headers=_auth(d)).status_code == 200, path
        refused = client.get(path)
        assert refused.status_code == 401 and "needs a user's token" in refused.json()["detail"], path
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
    assert client.get("/api/session").json() == {
        "public_read": False,
        "authenticated": False,
        "plaintext_exposures": [],
        "user": None,
        "role": None,
        "permissions": [],
    }
    assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200

    with TestClient(create_app(d, DashboardOptions(d.operator_token(), public_read=True))) as open_reads:
        for path in reads:
            assert open_reads.get(path).status_code == 200, path
        refused = open_reads.post(f"/api/rollouts/{rollout_id}/pause", json={"confirm": rollout_id})
        assert refused.status_code == 401 and _phase(d, rollout_id) == "baking"  # actions still need the token


def test_login_keeps_the_token_in_a_cookie_for_reads_but_never_for_actions(
    client: TestClient, coordinator: tuple[DataDir, str]
) -> None:
    d, rollout_id = coordinator
    assert client.post("/api/session", json={"token": "nope"}).status_code == 401
    assert client.post("/api/session", json={"token": ""}).status_code == 422
    assert COOKIE not in client.cookies
    ok = client.post("/api/session", json={"token": d.operator_token()})
    assert ok.status_code == 200 and client.cookies.get(COOKIE)
    assert client.get("/api/fleet").status_code == 200
    assert client.get("/api/session").json()["authenticated"] is True
    # A cookie alone (what another site could make a browser send) never acts.
    assert client.post(f"/api/rollouts/{rollout_id}/pause", json={"confirm": rollout_id}).status_code == 401
    assert _phase(d, rollout_id) == "baking"
    client.delete("/api/session")
    assert client.get("/api/fleet").status_code == 401


def test_fleet_counts_filters_and_bad_filters(client: TestClient, coordinator: tuple[DataDir, str]) -> None:
    d, _ = coordinator
    h = _auth(d)
    doc = client.get("/api/fleet", headers=h).json()
    assert doc["total"] == 6 and doc["online"] == 5
    assert doc["by_release"] == {"digits@1.0.0": 6}
    assert doc["by_state"] == {"failed": 1, "idle": 5}
    assert doc["by_label"] == {"site": {"site-0": 3, "site-1": 3}}

    def ids(**params: Any) -> list[str]:
        return [x["id"] for x in client.get("/api/fleet", params=params, headers=h).json()["devices"]]

    assert ids(online="false") == ["pi-5"]
    assert ids(state="failed") == ["pi-0"]
    assert ids(label="site=site-1") == ["pi-1", "pi-3", "pi-5"]
    assert ids(q="PI-4") == ["pi-4"]
    assert ids(release="none") == []
    assert ids(limit=2, offset=1) == ["pi-1", "pi-2"]
    for bad in ({"label": "site"}, {"limit": 0}, {"limit": 5000}, {"offset": -1}, {"online": "maybe"}):
        assert client.get("/api/fleet", params=bad, headers=h).status_code == 422, bad


def test_device_page_data_is_its_timeline(client: TestClient, coordinator: tuple[DataDir, str]) -> None:
    d, rollout_id = coordinator
    h = _auth(d)
    doc = client.get("/api/devices/pi-0", headers=h).json()
    assert doc["device"]["last_error"] == "probe crashed" and doc["device"]["online"] is True
    assert [e["kind"] for e in doc["events"]] == ["committed", "installed", "downloading"]
    assert [w["sequence"] for w in doc["telemetry"]] == [2, 1] and all(w["inferences"] == 400 for w in doc["telemetry"])
    assert all(w["max_psi"] is not None for w in doc["telemetry"])
    in_canary = [x for x in DEVICES if rollout_id in client.get(f"/api/devices/{x}", headers=h).json()["rollouts"]]
    assert len(in_canary) == 6  # every device of the fleet belongs to the rollout (in some wave)
    assigned = [
        x for x in DEVICES if client.get(f"/api/devices/{x}", headers=h).json()["assigned_release"] == "digits@2.0.0"
    ]
    assert len(assigned) == 2  # the canary
    missing = client.get("/api/devices/pi-99", headers=h)
    assert missing.status_code == 404 and "no device" in missing.json()["detail"]
    assert client.get("/api/devices/pi-0", params={"limit": 0}, headers=h).status_code == 422


def test_rollout_view_and_actions_with_refusals_that_change_nothing(
    coordinator: tuple[DataDir, str], tmp_path: Path
) -> None:
    d, rollout_id = _copy(coordinator[0], tmp_path), coordinator[1]  # it pauses and resumes the rollout
    with TestClient(create_app(d, DashboardOptions(d.operator_token()))) as client:
        _rollout_view_and_actions(client, d, rollout_id)


def _rollout_view_and_actions(client: TestClient, d: DataDir, rollout_id: str) -> None:
    h = _auth(d)
    [listed] = client.get("/api/rollouts", headers=h).json()
    assert listed["id"] == rollout_id and listed["phase"] == "baking"
    doc = client.get(f"/api/rollouts/{rollout_id}", headers=h).json()
    assert sum(doc["waves"][0]["devices"].values()) == 2  # the canary
    assert doc["gate_history"] and {g["metric"] for g in doc["gate_history"][0]["gates"]} >= {"input_max_psi"}
    assert doc["gates"] == doc["gate_history"][-1]["gates"] and doc["gates_at"] == doc["gate_history"][-1]["at"]
    assert [x["decision"] for x in doc["decisions"]][:2] == ["created", "start"]
    assert client.get("/api/rollouts/rollout-99", headers=h).status_code == 404

    before = client.get("/api/audit", headers=h).json()["checked"]
    for path, body, code in (
        (f"/api/rollouts/{rollout_id}/explode", {"confirm": rollout_id}, 422),  # no such action
        (f"/api/rollouts/{rollout_id}/pause", {"confirm": "rollout-0"}, 422),  # the confirmation is wrong
        (f"/api/rollouts/{rollout_id}/pause", {}, 422),  # no confirmation
        (f"/api/rollouts/{rollout_id}/resume", {"confirm": rollout_id}, 409),  # not paused
        ("/api/rollouts/rollout-99/pause", {"confirm": "rollout-99"}, 404),
    ):
        assert client.post(path, json=body, headers=h).status_code == code, path
    assert _phase(d, rollout_id) == "baking"
    assert client.get("/api/audit", headers=h).json()["checked"] == before  # nothing was recorded

    paused = client.post(f"/api/rollouts/{rollout_id}/pause", json={"confirm": rollout_id}, headers=h)
    assert paused.status_code == 200 and paused.json()["phase"] == "paused"
    assert _phase(d, rollout_id) == "paused"
    last = client.get("/api/audit", params={"limit": 1}, headers=h).json()["entries"][0]
    assert (last["action"], last["actor"], last["subject"]) == ("rollout.pause", "user:operator", rollout_id)
    assert client.post(f"/api/rollouts/{rollout_id}/pause", json={"confirm": rollout_id}, headers=h).status_code == 409
    resumed = client.post(f"/api/rollouts/{rollout_id}/resume", json={"confirm": rollout_id}, headers=h)
    assert resumed.status_code == 200 and _phase(d, rollout_id) == "baking"


def test_drift_view_pools_by_cohort_and_refuses_bad_parameters(
    client: TestClient, coordinator: tuple[DataDir, str]
) -> None:
    d, _ = coordinator
    h = _auth(d)
    drift = client.get("/api/drift", params={"cohort_by": "site", "minutes": 10}, headers=h).json()
    assert {(s["cohort"], s["release"]) for s in drift["series"]} == {
        ("site-0", "digits@1.0.0"),
        ("site-1", "digits@1.0.0"),
    }
    points = [p for s in drift["series"] for p in s["points"]]
    assert sum(p["inferences"] for p in points) == 6 * 2 * 400
    assert all(
        len(p["feature_psi"]) == 64 and p["max_psi"] == pytest.approx(max(p["feature_psi"]), abs=1e-4) for p in points
    )
    assert client.get("/api/drift", params={"release": "digits@9"}, headers=h).status_code == 404
    for bad in ({"minutes": 0}, {"buckets": 0}, {"buckets": 1000}):
        assert client.get("/api/drift", params=bad, headers=h).status_code == 422, bad


@pytest.mark.slow
@pytest.mark.ray
def test_training_privacy_models_and_audit_views(trained_client: TestClient, trained: tuple[DataDir, str]) -> None:
    client = trained_client
    d, _ = trained
    h = _auth(d)
    # One completed run (a run whose engine failed to start is retried as a new run, and listed as failed).
    [run] = [r for r in client.get("/api/training", headers=h).json() if r["status"] != "failed"]
    assert run["status"] == "completed" and [r["round"] for r in run["rounds"]] == [0, 1, 2]
    detail = client.get(f"/api/training/{run['id']}", headers=h).json()
    assert detail["plan"]["rounds"] == 2 and detail["model_version"] == "digits@1"
    assert client.get("/api/training/run-nope", headers=h).status_code == 404

    privacy = client.get("/api/privacy", headers=h).json()
    store = d.store()
    try:
        ledger = Ledger(store, 10.0)
        assert {x["device"]: x["lifetime_epsilon"] for x in privacy["devices"]} == {
            dev: pytest.approx(ledger.lifetime(dev)) for dev in {r["device"] for r in ledger.rows()}
        }
    finally:
        store.close()
    assert privacy["default_budget"] == 10.0 and len(privacy["devices"]) == 2

    [model] = client.get("/api/models", headers=h).json()
    card = client.get(f"/api/models/{model['version']}", headers=h).json()
    assert card["card"]["training"]["rounds"] == 2 and "# Model card: digits@1" in card["card_markdown"]
    assert client.get("/api/models/digits@7", headers=h).status_code == 404

    trail = client.get("/api/audit", headers=h).json()
    assert trail["verified"] and trail["checked"] >= 3 and trail["entries"][0]["seq"] == trail["checked"]
    assert client.get("/api/audit", params={"limit": 0}, headers=h).status_code == 422


def test_openapi_documents_every_endpoint_the_pages_use(client: TestClient, coordinator: tuple[DataDir, str]) -> None:
    assert client.get("/api/openapi.json").status_code == 401  # the map of the API is a read like the others
    spec = client.get("/api/openapi.json", headers=_auth(coordinator[0])).json()
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    app: FastAPI = client.app  # type: ignore[assignment]
    served = {
        (m, r.path) for r in app.routes if getattr(r, "include_in_schema", False) for m in getattr(r, "methods", ())
    }
    assert served <= documented and ("POST", "/api/rollouts/{rollout_id}/{action}") in documented
    app_js = (Path(__file__).resolve().parents[2] / "server/dashboard/static/app.js").read_text()
    cli_only = (
        "/api/privacy/consent",  # `fedfleet privacy consent --server URL` reads it; no page shows consent yet
        # `fedfleet privacy monitoring --server URL` reads it; the Privacy page shows the per-device totals that
        # GET /api/privacy carries (a reader's view, like the training budgets there), not this export
        "/api/privacy/monitoring",
        "/api/status",  # `fedfleet status --server URL` reads it; the Fleet page has its own, fuller reads
    )
    for _, path in documented:
        stem = path.split("{")[0].rstrip("/")
        if stem.startswith("/api/") and stem not in ("/api/openapi.json", *cli_only):
            assert stem in app_js, f"{path} is documented but no page uses it"


@pytest.mark.slow
@pytest.mark.ray
def test_metrics_parse_and_match_the_store(trained: tuple[DataDir, str], tmp_path: Path) -> None:
    d, rollout_id = _copy(trained[0], tmp_path), trained[1]  # it sends the store a window to refuse
    store = d.store()
    rejected_before = REJECTED["mqtt"]
    ref = digits_reference()
    overlapping = window_to_proto(window(ref, 10, 1), "pi-1", 2, 1)  # covers 1..2, stored as two windows: refused
    assert isinstance(ingest_windows(store, [(overlapping, "pi-1")], via="mqtt")[0], EventRejected)
    with TestClient(create_app(d, DashboardOptions(d.operator_token()), broker_connected=lambda: True)) as c:
        text = c.get("/metrics", headers=_auth(d)).text
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def samples(name: str) -> list[Any]:
        return families[name].samples

    online = sum(s.value for s in samples("fedfleet_devices") if s.labels["online"] == "true")
    assert online == store.db.execute("SELECT count(*) FROM devices WHERE online = 1").fetchone()[0] == 5
    by_state = {s.labels["state"]: 0.0 for s in samples("fedfleet_devices")}
    for s in samples("fedfleet_devices"):
        by_state[s.labels["state"]] += s.value
    assert by_state == {"failed": 1, "idle": 5}
    events = {s.labels["kind"]: s.value for s in samples("fedfleet_update_events") if s.name.endswith("_total")}
    assert events == dict(store.db.execute("SELECT kind, count(*) FROM events GROUP BY kind").fetchall())
    ingested = {
        s.labels["via"]: s.value for s in samples("fedfleet_telemetry_windows_ingested") if s.name.endswith("_total")
    }
    assert ingested == {"mqtt": 12}
    rejected = {
        s.labels["via"]: s.value for s in samples("fedfleet_telemetry_windows_rejected") if s.name.endswith("_total")
    }
    assert rejected["mqtt"] == rejected_before + 1
    phase = {(s.labels["rollout"], s.labels["phase"]) for s in samples("fedfleet_rollout_phase") if s.value == 1}
    assert phase == {(rollout_id, _phase(d, rollout_id))}
    last = json.loads(
        store.db.execute(
            "SELECT gates FROM rollout_gate_samples WHERE rollout_id = ? ORDER BY at DESC LIMIT 1", [rollout_id]
        ).fetchone()[0]
    )
    thresholds = {s.labels["metric"]: s.value for s in samples("fedfleet_rollout_gate_threshold")}
    assert thresholds == {g["metric"]: g["threshold"] for g in last}
    values = {s.labels["metric"]: s.value for s in samples("fedfleet_rollout_gate_value")}
    assert values == {g["metric"]: pytest.approx(g["value"]) for g in last if g["value"] is not None}
    rounds = store.db.execute("SELECT count(*), sum(seconds) FROM fl_rounds WHERE round > 0").fetchone()
    summary = {s.name: s.value for s in samples("fedfleet_fl_round_duration_seconds")}
    assert summary["fedfleet_fl_round_duration_seconds_count"] == rounds[0] == 2
    assert summary["fedfleet_fl_round_duration_seconds_sum"] == pytest.approx(rounds[1])
    eps = store.db.execute("SELECT epsilon_max FROM fl_rounds ORDER BY round DESC LIMIT 1").fetchone()[0]
    assert [s.value for s in samples("fedfleet_fl_epsilon")] == [pytest.approx(eps)]
    assert [s.value for s in samples("fedfleet_broker_connected")] == [1]
    store.close()


def test_live_feed_reports_a_change(coordinator: tuple[DataDir, str], tmp_path: Path) -> None:
    d, rollout_id = _copy(coordinator[0], tmp_path), coordinator[1]  # it pauses the rollout
    server = AppServer(create_app(d, DashboardOptions(d.operator_token(), feed_seconds=0.2)))
    store = d.store()
    try:

        def touch_events(n: int) -> None:
            """A change in the events table (nothing the pause below changes)."""
            row = {"device_id": "pi-1", "counter": 1, "release_id": "digits@1.0.0", "target_path": "t"}
            nudge = {**row, "kind": "downloading", "reason": "", "detail": f"nudge {n}", "device_time": 0}
            store.record_events([nudge], via="test")

        async def watch() -> list[str]:
            async with (
                httpx.AsyncClient(base_url=server.url, headers=_auth(d), timeout=10) as http,
                http.stream("GET", "/api/stream") as stream,
            ):
                assert stream.status_code == 200
                lines = stream.aiter_lines()
                assert (await anext(lines)) == "event: hello"
                changes: asyncio.Queue[list[str]] = asyncio.Queue()

                async def read() -> None:  # one reader: waiting on the queue may time out, reading may not
                    async for line in lines:
                        if line.startswith("data:") and "changed" in line:
                            await changes.put(json.loads(line[5:])["changed"])

                reader = asyncio.create_task(read())
                try:
                    # The feed reads its first marks after the stream opens; a change made before that is part
                    # of them and never reported. So nudge the store until the feed reports a nudge: from then
                    # on it is watching, and the pause below is a change it must report.
                    for n in range(30):
                        touch_events(n)
                        try:
                            if "events" in await asyncio.wait_for(changes.get(), 2):
                                break
                        except TimeoutError:
                            assert not reader.done(), "the stream ended"
                    else:
                        raise AssertionError("the feed never reported a change to the events table")
                    paused = await http.post(f"/api/rollouts/{rollout_id}/pause", json={"confirm": rollout_id})
                    assert paused.status_code == 200
                    while "rollouts" not in (changed := await changes.get()):
                        pass
                    return changed
                finally:
                    reader.cancel()
                    await asyncio.gather(reader, return_exceptions=True)

        changed = asyncio.run(asyncio.wait_for(watch(), 120))
        assert "rollouts" in changed and "audit" in changed  # how soon: benchmarks/dashboard_load.py measures it

        async def refused() -> int:
            async with httpx.AsyncClient(base_url=server.url) as http:
                return (await http.get("/api/stream")).status_code

        assert asyncio.run(refused()) == 401
    finally:
        store.close()
        server.stop()


def test_tampered_audit_trail_shows_as_broken(coordinator: tuple[DataDir, str], tmp_path: Path) -> None:
    d = _copy(coordinator[0], tmp_path)
    store = Store(d.db_path)
    store.db.execute("UPDATE audit SET detail = ? WHERE seq = 1", [json.dumps({"edited": True})])
    store.close()
    with TestClient(create_app(d, DashboardOptions(d.operator_token()))) as c:
        trail = c.get("/api/audit", headers=_auth(d)).json()
    assert not trail["verified"] and any("entry 1: edited" in p for p in trail["problems"])


def test_drift_buckets_are_reused_only_while_their_windows_are_the_same(
    coordinator: tuple[DataDir, str], tmp_path: Path
) -> None:
    d = _copy(coordinator[0], tmp_path)
    store = d.store()
    try:
        first = views.drift_view(store, "site", minutes=10)
        again = views.drift_view(store, "site", minutes=10)
        assert again["series"] == first["series"]
        ref = digits_reference()
        newest = max(p["at"] for s in first["series"] for p in s["points"])  # a bucket already pooled and kept
        late = window(ref, 333, 77)
        late = type(late)(late.release_id, newest - 500, newest, late.counts)
        assert not isinstance(
            ingest_windows(store, [(window_to_proto(late, "pi-1", 3, 3), "pi-1")], "grpc")[0], Exception
        )
        after = views.drift_view(store, "site", minutes=10)
        total = {s["cohort"]: sum(p["inferences"] for p in s["points"]) for s in after["series"]}
        assert total == {"site-0": 3 * 2 * 400, "site-1": 3 * 2 * 400 + 333}  # pi-1 is at site-1
        store.place_device("pi-1", None, {"site": "site-0"})  # moved by the operator: its windows change cohort
        moved = views.drift_view(store, "site", minutes=10)
        total = {s["cohort"]: sum(p["inferences"] for p in s["points"]) for s in moved["series"]}
        assert total == {"site-0": 4 * 2 * 400 + 333, "site-1": 2 * 2 * 400}
    finally:
        store.close()


def test_a_rotated_token_applies_at_once_to_a_running_dashboard(
    coordinator: tuple[DataDir, str], tmp_path: Path
) -> None:
    d = _copy(coordinator[0], tmp_path)
    old = d.operator_token()
    with TestClient(create_app(d, DashboardOptions(d.operator_token))) as c:
        assert c.get("/api/fleet", headers={"Authorization": f"Bearer {old}"}).status_code == 200
        new = d.operator_token(rotate=True)
        assert new != old
        assert c.get("/api/fleet", headers={"Authorization": f"Bearer {old}"}).status_code == 401
        assert c.get("/api/fleet", headers={"Authorization": f"Bearer {new}"}).status_code == 200
