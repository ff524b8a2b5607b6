"""The privacy officer's commands from anywhere (issue 20): `fedfleet privacy ledger`, `models list|show` and
`privacy consent [--device ID]` give the same rows, tables and JSON against the coordinator's API (`--server URL`
and a token) as on its host against the data directory; a role without privacy.manage is refused in one sentence
and nothing changes; an unknown device is refused; a device that withdraws shows in its consent history.

Real parts: a data directory with SQLite; devices that register over the real FleetService (gRPC on a free
loopback port), stating their owners' consent as an agent does; one private training run of the real ServerApp
and ClientApps in this process (Flower's Grid interface, no Ray); the dashboard API on uvicorn on a free loopback
port; `fedfleet` in processes of their own, from a directory without a data directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge_agent.transport import GrpcTransport
from server import audit
from server.dashboard.api import DashboardOptions, create_app
from server.datadir import DataDir
from server.store.consent import ConsentRecords
from tests.support import AppServer, GrpcServerThread

# Opacus' hooks on a frozen input, in the training run of the `trained` fixture (as in tests/server/test_consent.py)
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

DEVICES = ("pi-a", "pi-b", "pi-c")  # their owners grant consent; pi-b's owner withdraws it later
SILENT = "pi-d"  # registers without stating any consent
ROLES = {"po": "privacy-officer", "vi": "viewer", "op": "operator", "rm": "release-manager"}


@dataclass
class Coordinator:
    d: DataDir
    url: str
    tokens: dict[str, str]  # user name -> token; "operator" is the admin
    cwd: Path  # a working directory without a data directory

    def run(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        """`fedfleet ARGS` in a process of its own: against the API as the token's user, or (token None) locally
        against the data directory."""
        where = ["--data-dir", str(self.d.root)] if token is None else []
        remote = ["--server", self.url] if token is not None else []
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDFLEET_")}
        env |= {"HOME": str(self.cwd), "XDG_CONFIG_HOME": str(self.cwd / ".config")}
        if token is not None:
            env["FEDFLEET_TOKEN"] = token
        return subprocess.run(
            [sys.executable, "-m", "server.cli", *remote, *args, *where],
            cwd=self.cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def both(self, *args: str, user: str = "po") -> tuple[str, str]:
        """The command's stdout locally and remotely as `user`, each having succeeded."""
        local, remote = self.run(*args), self.run(*args, token=self.tokens[user])
        assert local.returncode == 0, local.stderr
        assert remote.returncode == 0, remote.stderr
        return local.stdout, remote.stdout

    def get(self, path: str, user: str) -> tuple[int, Any]:
        """A plain HTTP GET of the API as `user`: the status and the JSON answer."""
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.tokens[user]}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def _register(server: GrpcServerThread, device_id: str, consent: bool | None) -> None:
    """What an agent does when it starts: register, stating its owner's consent from agent.toml (None: none)."""
    GrpcTransport(server.address, device_id).register("lab", {}, "ai-edge-litert", consent_training=consent)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    """Four registered devices (pi-b withdrew after granting, pi-d stated nothing), a user per role, the API."""
    root = tmp_path_factory.mktemp("remote-privacy")
    d, _ = DataDir.init(root / "data")
    with d.store() as store:
        grpc = GrpcServerThread(store, d.repository())
        try:
            for device in DEVICES:
                _register(grpc, device, True)
            _register(grpc, SILENT, None)
            time.sleep(0.01)  # the withdrawal comes later than the grant, to the millisecond
            _register(grpc, "pi-b", False)
        finally:
            grpc.stop()
        tokens = {name: d.users(store).add(name, role, "cli")[1] for name, role in ROLES.items()}
    tokens["operator"] = d.operator_token()
    (root / "laptop").mkdir()
    server = AppServer(create_app(d, DashboardOptions(d.operator_token())))
    try:
        yield Coordinator(d, server.url, tokens, root / "laptop")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def trained(coordinator: Coordinator) -> Coordinator:
    """One private training run over pi-a, pi-b and pi-c (each device's own node config consents; the
    coordinator's record of pi-b's withdrawal leaves it out): a model version and ledger rows."""
    from server.fl.plan import TrainPlan  # Flower, torch and Opacus only for the tests that train

    plan = TrainPlan(rounds=1, clients=3, noise_multiplier=1.0, local_epochs=1, seed=4, exact_reference=True)
    _train(coordinator.d, plan, "run-remote-privacy")
    return coordinator


def _one_sentence(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, (done.stdout, done.stderr)
    message = done.stderr.strip()
    assert message.startswith("fedfleet: ") and "\n" not in message and "Traceback" not in message, message
    assert done.stdout == ""
    return message


def _state(d: DataDir) -> tuple[int, list[tuple[Any, ...]]]:
    """What a refused request must leave as it was: the audit trail's length and every consent statement."""
    with d.store() as store:
        statements = list(store.db.execute("SELECT * FROM consent ORDER BY id").fetchall())
        return audit.verify(store)[0], statements


# ----- consent -----


@pytest.mark.slow
def test_consent_lists_each_device_the_same_locally_and_remotely(coordinator: Coordinator) -> None:
    # Execute
    local, remote = coordinator.both("privacy", "consent", "--json")
    local_table, remote_table = coordinator.both("privacy", "consent")

    # Assert: the same document and table both ways, and what each owner stated
    assert local == remote and local_table == remote_table
    rows = {r["device"]: r for r in json.loads(local)}
    assert {d: (r["consent"], r["source"], r["registered"]) for d, r in rows.items()} == {
        "pi-a": ("granted", "agent", True),
        "pi-b": ("withdrawn", "agent", True),
        "pi-c": ("granted", "agent", True),
        SILENT: ("unknown", None, True),
    }
    assert rows["pi-b"]["recorded_at"] > rows["pi-a"]["recorded_at"] and rows[SILENT]["recorded_at"] is None
    assert all(r["purpose"] == "training" for r in rows.values())
    lines = {line.split()[1]: line for line in local_table.splitlines() if line.startswith("│ pi-")}
    assert "withdrawn" in lines["pi-b"] and "agent" in lines["pi-b"] and "unknown" in lines[SILENT], local_table


@pytest.mark.slow
def test_a_device_that_withdrew_shows_both_statements_in_its_history(coordinator: Coordinator) -> None:
    # Execute
    local, remote = coordinator.both("privacy", "consent", "--device", "pi-b", "--json")
    text, remote_text = coordinator.both("privacy", "consent", "--device", "pi-b")
    silent, _ = coordinator.both("privacy", "consent", "--device", SILENT, "--json")

    # Assert: granted, then withdrawn, both from the owner's agent.toml, as the store holds them
    assert local == remote and text == remote_text
    doc = json.loads(local)
    assert (doc["device"], doc["consent"], doc["source"], doc["registered"]) == ("pi-b", "withdrawn", "agent", True)
    assert [(h["consent"], h["source"], h["purpose"]) for h in doc["history"]] == [
        ("granted", "agent", "training"),
        ("withdrawn", "agent", "training"),
    ]
    with coordinator.d.store() as store:
        stored = ConsentRecords(store).history("pi-b")
    assert [h["recorded_at"] for h in doc["history"]] == [s["recorded_at"] for s in stored]
    assert doc["recorded_at"] == stored[-1]["recorded_at"]
    assert text.startswith("pi-b: training consent withdrawn since ") and "(agent)." in text.splitlines()[0]
    assert "granted" in text and text.count("agent") == 3, text
    assert json.loads(silent) | {"history": None} == {
        "device": SILENT,
        "purpose": "training",
        "consent": "unknown",
        "recorded_at": None,
        "source": None,
        "registered": True,
        "history": None,
    }
    assert json.loads(silent)["history"] == []


def test_an_unknown_device_is_refused_locally_and_remotely(coordinator: Coordinator) -> None:
    # Prepare
    before = _state(coordinator.d)

    # Execute
    local = coordinator.run("privacy", "consent", "--device", "pi-nope")
    remote = coordinator.run("privacy", "consent", "--device", "pi-nope", token=coordinator.tokens["po"])
    status, answer = coordinator.get("/api/privacy/consent/pi-nope", "po")

    # Assert: one sentence naming the device and where the known ones are listed; nothing changed
    for done in (local, remote):
        message = _one_sentence(done)
        assert "no device 'pi-nope'" in message and "`fedfleet privacy consent`" in message, message
    assert status == 404 and "pi-nope" in answer["detail"]
    assert _state(coordinator.d) == before


def test_consent_is_refused_to_every_role_without_privacy_manage(coordinator: Coordinator) -> None:
    # Prepare
    before = _state(coordinator.d)

    # Execute: each role asks for the list and for one device's history, over HTTP and with the CLI
    answers = {
        user: (coordinator.get("/api/privacy/consent", user), coordinator.get("/api/privacy/consent/pi-a", user))
        for user in ("operator", "po", "vi", "op", "rm")
    }
    refused = coordinator.run("privacy", "consent", token=coordinator.tokens["vi"])
    refused_one = coordinator.run("privacy", "consent", "--device", "pi-a", token=coordinator.tokens["rm"])

    # Assert: the admin and the privacy officer read them; viewer, operator and release manager get 403
    for user in ("operator", "po"):
        (listed, rows), (shown, doc) = answers[user]
        assert (listed, shown) == (200, 200) and len(rows) == 4 and doc["device"] == "pi-a", user
    for user, role in (("vi", "viewer"), ("op", "operator"), ("rm", "release-manager")):
        for status, answer in answers[user]:
            assert status == 403, user
            assert answer["detail"].startswith(f"user {user} ({role}) lacks the privacy.manage permission")
    assert "vi (viewer) lacks the privacy.manage permission" in _one_sentence(refused)
    assert "rm (release-manager) lacks the privacy.manage permission" in _one_sentence(refused_one)
    assert _state(coordinator.d) == before


def test_the_consent_endpoints_are_in_the_openapi_document(coordinator: Coordinator) -> None:
    status, spec = coordinator.get("/api/openapi.json", "vi")

    assert status == 200
    for path in ("/api/privacy/consent", "/api/privacy/consent/{device_id}", "/api/privacy/ledger"):
        get = spec["paths"][path]["get"]
        assert get["tags"] == ["training"] and "privacy.manage" in get["description"], path
    ledger_params = {p["name"] for p in spec["paths"]["/api/privacy/ledger"]["get"]["parameters"]}
    assert ledger_params == {"device"}


# ----- the ledger and the models, after a training run -----


@pytest.mark.slow  # Flower, torch and Opacus load, and a private round trains (about 20 s on a busy 2-core box)
def test_the_ledger_is_the_same_remotely_and_refused_to_a_viewer(trained: Coordinator) -> None:
    # Prepare
    before = _state(trained.d)

    # Execute
    local, remote = trained.both("privacy", "ledger", "--json")
    table, remote_table = trained.both("privacy", "ledger")
    one, remote_one = trained.both("privacy", "ledger", "--device", "pi-a", "--json")
    refused = trained.run("privacy", "ledger", token=trained.tokens["vi"])

    # Assert: the same rows both ways; pi-b, which withdrew, spent nothing in the run; --device keeps its rows
    assert local == remote and table == remote_table and one == remote_one
    rows = json.loads(local)
    assert {r["device"] for r in rows} == {"pi-a", "pi-c"} and all(r["consented"] is True for r in rows)
    assert {r["purpose"] for r in rows} >= {"training"} and all(r["run"] == "run-remote-privacy" for r in rows)
    assert json.loads(one) == [r for r in rows if r["device"] == "pi-a"] != []
    assert "run-remote-privacy" in table and "pi-c" in table
    assert "vi (viewer) lacks the privacy.manage permission" in _one_sentence(refused)
    assert _state(trained.d) == before


@pytest.mark.slow  # shares the training run of the test above
def test_models_list_and_show_are_the_same_remotely(trained: Coordinator) -> None:
    # Execute: a viewer may read the registry
    listed, remote_listed = trained.both("models", "list", "--json", user="vi")
    table, remote_table = trained.both("models", "list", user="vi")
    shown, remote_shown = trained.both("models", "show", "digits@1", "--json", user="vi")
    text, remote_text = trained.both("models", "show", "digits@1", user="vi")
    card, remote_card = trained.both("models", "show", "digits@1", "--card", user="vi")
    missing = trained.run("models", "show", "digits@9")
    remote_missing = trained.run("models", "show", "digits@9", token=trained.tokens["vi"])

    # Assert
    assert listed == remote_listed and table == remote_table
    assert shown == remote_shown and text == remote_text and card == remote_card
    [model] = json.loads(listed)
    assert (model["version"], model["run_id"]) == ("digits@1", "run-remote-privacy") and "digits@1" in table
    doc = json.loads(shown)
    assert doc.keys() == {"version", "card", "lineage", "incidents"}
    assert doc["lineage"]["consent"] == {"required": False, "devices": ["pi-a", "pi-c"], "without_consent": ["pi-b"]}
    assert [i["kind"] for i in doc["incidents"] if i["device_id"] == "pi-b"] == ["skipped-consent"]
    assert "# Model card: digits@1" in card and "skipped-consent" in text and "skipped-consent" not in card
    for done in (missing, remote_missing):
        assert "no model version 'digits@9'" in _one_sentence(done)


# ----- one private run of the real ServerApp and ClientApps, in this process -----


def _train(d: DataDir, plan: Any, run_id: str) -> None:
    from server.fl.client_app import build_client_app
    from tests.server.grid import LocalGrid, run_server_app  # Flower loads only for the tests that train

    nodes = {
        i + 1: {
            "device-id": device,
            "partition-id": i,
            "num-partitions": len(DEVICES),
            "consent-training": True,
            "state-dir": str(d.root / "fl-devices"),
        }
        for i, device in enumerate(DEVICES)
    }
    run_server_app(d.root, plan, run_id, LocalGrid(build_client_app(allow_exact_reference=True), nodes))
