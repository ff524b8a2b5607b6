"""The monitoring ledger made visible: `fedfleet privacy monitoring [--device ID] [--json]` gives the same rows on
the coordinator's host and through the API (`--server`, a privacy officer's token), from the one query
(`MonitoringLedger.spends`); a viewer is refused in one sentence, an unknown device clearly, an empty ledger says
so; the Privacy page's `GET /api/privacy` carries the per-device totals; `fedfleet-agent status` shows the
device's own monitoring budget when its agent.toml noises telemetry, and nothing of it when not.

Real parts: data directories with SQLite; noised windows built as in tests/server/test_monitoring_budget.py and
stored through the coordinator's ingest path; the dashboard API on uvicorn on a free loopback port; `fedfleet` and
`fedfleet-agent` in processes of their own; a real agent's recorder spending its budget in its state directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.contract.drift import WindowCounts, WindowNoise
from server.cli.common import local_time
from server.dashboard.api import DashboardOptions, create_app
from server.datadir import DataDir
from server.ingest.events import EventRejected
from server.ingest.telemetry import ingest_windows
from server.store import Store
from server.store.monitoring import MonitoringLedger
from server.trust.enrollment import write_bundle
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers
from tests.agent.test_telemetry_dp import _agent_windows
from tests.server.test_monitoring_budget import CLASSES, FEATURES, counts, message, noisy, reference
from tests.server.test_remote_privacy import ROLES, Coordinator, _one_sentence
from tests.support import AppServer

# pi-1 noises at ε 0.5 on a budget of 10; pi-2 spends its budget of 2 at ε 1 and then says so (a marker); pi-3 sends
# exact windows only; pi-4's second window (ε 1) never reached the coordinator, so the device counts more than it.
EXPECTED = {
    "pi-1": {"windows": 3, "epsilon": 1.5, "device_spent": 1.5, "device_budget": 10.0, "exhausted": False},
    "pi-2": {"windows": 2, "epsilon": 2.0, "device_spent": 2.0, "device_budget": 2.0, "exhausted": True},
    "pi-4": {"windows": 2, "epsilon": 2.0, "device_spent": 3.0, "device_budget": 10.0, "exhausted": False},
}


def _noised_fleet(d: DataDir, store: Store) -> None:
    """Registers pi-1..pi-4, publishes the release their windows report on, and stores their windows through the
    coordinator's ingest path, as a batch from gRPC bulk upload would arrive."""
    for device in ("pi-1", "pi-2", "pi-3", "pi-4"):
        store.register_device(device, "lab", {}, {}, "t")
    ref = reference()
    model = build_dense_model(random_dense_layers([FEATURES, 16, CLASSES], 1))
    publish_release(
        d.repository(),
        store,
        model,
        "digits",
        "1.0.0",
        extra={"drift_reference": ref.to_metadata()},
    )
    marker = WindowCounts.empty(ref)
    marker.noise = WindowNoise(0.0, 0.0, 2.0, 2.0, exhausted=True)
    batch = [(message(noisy(ref, 200, s, 0.5, 0.5 * s, 10.0), "pi-1", s), "pi-1") for s in (1, 2, 3)]
    batch += [(message(noisy(ref, 100, s, 1.0, 1.0 * s, 2.0), "pi-2", s), "pi-2") for s in (1, 2)]
    batch += [(message(marker, "pi-2", 3), "pi-2")]
    batch += [(message(counts(ref, 200, 9), "pi-3", 1), "pi-3")]
    batch += [(message(noisy(ref, 100, s, 1.0, 1.0 * s, 10.0), "pi-4", s), "pi-4") for s in (1, 3)]
    assert not [r for r in ingest_windows(store, batch, "grpc") if isinstance(r, EventRejected)]


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    """A data directory whose monitoring ledger holds pi-1, pi-2 and pi-4, a user per role, the API."""
    root = tmp_path_factory.mktemp("monitoring-views")
    d, _ = DataDir.init(root / "data")
    with d.store() as store:
        _noised_fleet(d, store)
        tokens = {name: d.users(store).add(name, role, "cli")[1] for name, role in ROLES.items()}
    tokens["operator"] = d.operator_token()
    (root / "laptop").mkdir()
    server = AppServer(create_app(d, DashboardOptions(d.operator_token())))
    try:
        yield Coordinator(d, server.url, tokens, root / "laptop")
    finally:
        server.stop()


def _ledger(d: DataDir) -> list[dict[str, Any]]:
    with d.store() as store:
        return [s.to_json() for s in MonitoringLedger(store).spends()]


# ----- fedfleet privacy monitoring -----


@pytest.mark.slow
def test_monitoring_is_the_same_locally_and_remotely(coordinator: Coordinator) -> None:
    # Execute
    local, remote = coordinator.both("privacy", "monitoring", "--json")
    table, remote_table = coordinator.both("privacy", "monitoring")
    one, remote_one = coordinator.both("privacy", "monitoring", "--device", "pi-2", "--json")

    # Assert: the same document and table both ways, the ledger's own rows, and what each device spent
    assert local == remote and table == remote_table and one == remote_one
    rows = json.loads(local)
    assert rows == _ledger(coordinator.d)
    assert {r["device"]: {k: r[k] for k in EXPECTED["pi-1"]} for r in rows} == EXPECTED  # pi-3 spent nothing
    assert [r["last_sequence"] for r in rows] == [3, 3, 3]  # pi-2's newest is its budget-spent marker
    assert json.loads(one) == [r for r in rows if r["device"] == "pi-2"]
    lines = {line.split()[1]: line for line in table.splitlines() if line.startswith("│ pi-")}
    assert set(lines) == {"pi-1", "pi-2", "pi-4"}, table
    assert "│ yes " in lines["pi-2"] and "│ no " in lines["pi-1"]
    assert "1.500" in lines["pi-1"] and "10.000" in lines["pi-1"]
    assert local_time(rows[0]["last_received_at"]) in lines["pi-1"]  # ISO local time
    assert "Where the two ε differ" in table  # pi-4: the device paid for a window the coordinator never stored


def test_a_role_without_privacy_manage_is_refused_in_one_sentence(coordinator: Coordinator) -> None:
    # Execute
    answers = {user: coordinator.get("/api/privacy/monitoring", user) for user in ("operator", "po", "vi", "op")}
    refused = coordinator.run("privacy", "monitoring", token=coordinator.tokens["vi"])

    # Assert: the admin and the privacy officer read it; a viewer and an operator get 403
    for user in ("operator", "po"):
        status, rows = answers[user]
        assert status == 200 and [r["device"] for r in rows] == ["pi-1", "pi-2", "pi-4"], user
    for user, role in (("vi", "viewer"), ("op", "operator")):
        status, answer = answers[user]
        assert status == 403 and answer["detail"].startswith(f"user {user} ({role}) lacks the privacy.manage")
    assert "vi (viewer) lacks the privacy.manage permission" in _one_sentence(refused)


def test_an_unknown_device_is_refused_locally_and_remotely(coordinator: Coordinator) -> None:
    # Execute
    local = coordinator.run("privacy", "monitoring", "--device", "pi-nope")
    remote = coordinator.run("privacy", "monitoring", "--device", "pi-nope", token=coordinator.tokens["po"])
    status, answer = coordinator.get("/api/privacy/monitoring?device=pi-nope", "po")

    # Assert: one sentence naming the device and where the known ones are listed
    for done in (local, remote):
        message = _one_sentence(done)
        assert "no device 'pi-nope'" in message and "`fedfleet privacy monitoring`" in message, message
    assert status == 404 and "pi-nope" in answer["detail"]


def test_a_registered_device_with_exact_telemetry_says_why_it_has_no_row(coordinator: Coordinator) -> None:
    # Execute: pi-3 is registered and sends exact windows
    text, remote_text = coordinator.both("privacy", "monitoring", "--device", "pi-3")
    doc = coordinator.run("privacy", "monitoring", "--device", "pi-3", "--json")

    # Assert: no row, and a sentence saying why
    assert text == remote_text
    assert text.strip() == (
        "pi-3 has sent no noised telemetry windows: its telemetry is exact (its agent.toml sets no [telemetry] "
        "dp_epsilon_per_window)."
    )
    assert doc.returncode == 0 and json.loads(doc.stdout) == []


def test_an_empty_ledger_is_one_sentence(datadir: DataDir) -> None:
    # Prepare: a coordinator whose devices send exact windows only
    with datadir.store() as store:
        store.register_device("pi-1", "lab", {}, {}, "t")

    # Execute
    text = _fedfleet(datadir, "privacy", "monitoring")
    doc = _fedfleet(datadir, "privacy", "monitoring", "--json")

    # Assert
    assert text.strip() == (
        "No device has sent noised telemetry windows: telemetry is exact unless a device's agent.toml sets "
        "[telemetry] dp_epsilon_per_window."
    )
    assert json.loads(doc) == []


def _fedfleet(d: DataDir, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", *args, "--data-dir", str(d.root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# ----- the Privacy page -----


def test_the_privacy_page_reads_the_totals_any_reader_may_read(coordinator: Coordinator) -> None:
    # Execute: the page's one read, as a viewer
    status, doc = coordinator.get("/api/privacy", "vi")

    # Assert: per device what the export says, as totals (like the training budgets beside them)
    assert status == 200
    assert doc["monitoring"] == [
        {
            "device": r["device"],
            "windows": r["windows"],
            "epsilon": r["epsilon"],
            "device_spent": r["device_spent"],
            "budget": r["device_budget"],
            "exhausted": r["exhausted"],
        }
        for r in _ledger(coordinator.d)
    ]
    app_js = (Path(__file__).resolve().parents[2] / "server/dashboard/static/app.js").read_text()
    assert "Monitoring budget (noised telemetry)" in app_js and "monitoringTable(doc.monitoring" in app_js


@pytest.mark.slow  # drives Chromium: browser tests are slow
@pytest.mark.browser
def test_the_privacy_page_shows_the_monitoring_budget_to_a_viewer(coordinator: Coordinator) -> None:
    """In real headless Chromium (as tests/system/test_dashboard_browser.py drives it), under the page's CSP."""
    from playwright.sync_api import expect, sync_playwright

    from tests.system.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS

    # Prepare
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (scripts/setup.sh --dev does this)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            refused: list[str] = []
            page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
            page.goto(coordinator.url + "/#/privacy")
            # Execute: a viewer signs in and the Privacy page draws
            page.fill("input[name=token]", coordinator.tokens["vi"])
            page.click("#login button")
            rows = page.locator("#monitoring tbody tr")
            expect(rows).to_have_count(3)
            cells = [[c.strip() for c in r.split("\t")] for r in rows.all_inner_texts()]
        finally:
            browser.close()

    # Assert: device, windows, ε spent / budget (with the device's own figure where it differs), exhausted
    assert cells == [
        ["pi-1", "3", "1.5 / 10", "no"],
        ["pi-2", "2", "2 / 2", "yes"],
        ["pi-4", "2", "2 (device: 3) / 10", "no"],
    ]
    assert refused == []


# ----- fedfleet-agent status -----


def _agent_status(config: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "status", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_agent_status_shows_the_monitoring_budget_when_telemetry_is_noised(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    # Prepare: an enrolled device whose agent.toml noises windows at ε 1 on a budget of 3; a real agent closes two
    write_bundle(coordinator.d, "pi-dp", tmp_path / "bundle", "lab", grpc="127.0.0.1:1", mqtt="mqtt://127.0.0.1:1")
    config = tmp_path / "bundle" / "agent.toml"
    config.write_text(
        config.read_text() + "\n[telemetry]\ndp_epsilon_per_window = 1.0\nmonitoring_budget_epsilon = 3\n"
    )
    agent = Agent(load_config(config))
    _agent_windows(agent, reference(), 2)

    # Execute
    before = json.loads(_agent_status(config, "--json"))
    _agent_windows(agent, reference(), 1)  # the budget's last window
    after = json.loads(_agent_status(config, "--json"))
    text = _agent_status(config)
    agent.outbox.close()

    # Assert
    def budget(doc: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(
            doc[k]
            for k in (
                "telemetry_epsilon_per_window",
                "monitoring_epsilon_spent",
                "monitoring_budget_epsilon",
                "monitoring_windows",
                "monitoring_exhausted",
            )
        )

    assert budget(before) == (1.0, 2.0, 3.0, 2, False)
    assert budget(after) == (1.0, 3.0, 3.0, 3, True)  # what is left no longer pays for a window
    shown = dict(line.split(None, 1) for line in text.splitlines())
    assert shown["monitoring_epsilon_spent"] == "3" and shown["monitoring_budget_epsilon"] == "3"
    assert shown["monitoring_exhausted"] == "True"


def test_agent_status_without_telemetry_noise_shows_no_monitoring_budget(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    # Prepare: an enrolled device with exact telemetry (no [telemetry] table)
    write_bundle(coordinator.d, "pi-ex", tmp_path / "bundle", "lab", grpc="127.0.0.1:1", mqtt="mqtt://127.0.0.1:1")
    config = tmp_path / "bundle" / "agent.toml"

    # Execute
    doc = json.loads(_agent_status(config, "--json"))
    text = _agent_status(config)

    # Assert: the status as before, nothing of a monitoring budget, and no monitoring.json written
    assert doc["device_id"] == "pi-ex" and not [k for k in doc if "monitoring" in k or k.startswith("telemetry")]
    assert "monitoring" not in text and "device_id" in text
    assert not (load_config(config).state_dir / "monitoring.json").exists()
