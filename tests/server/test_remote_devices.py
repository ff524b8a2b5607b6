"""Devices and releases from a laptop, against the coordinator's API (real uvicorn on loopback, a real data
directory and fleet CA): `devices revoke` needs the devices.manage permission, revokes the device's certificates
into the CRL and audits the user, and a second revoke, a missing confirmation and a role without the permission
change nothing; `releases show` gives the same document and text as on the coordinator's host."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from cryptography import x509

from server import audit
from simulations.dense_tflite import build_dense_model, random_dense_layers
from tests.server.test_remote_privacy import Coordinator, _one_sentence, coordinator  # noqa: F401 (the fixture)

# Each test runs `fedfleet` several times, locally and against the API: 2.6 to 16 s each with two workers on 2 cores.
pytestmark = pytest.mark.slow


def _revoked_serials(c: Coordinator) -> set[int]:
    """Every serial in crl.pem (one CRL per intermediate CA)."""
    path = c.d.trust / "crl.pem"
    end = "-----END X509 CRL-----"
    blocks = [b + end for b in path.read_text().split(end) if b.strip()] if path.exists() else []
    return {r.serial_number for b in blocks for r in x509.load_pem_x509_crl(b.encode())}


def _audit_length(c: Coordinator) -> int:
    with c.d.store() as store:
        return audit.verify(store)[0]


def _post(c: Coordinator, path: str, body: dict[str, str], user: str) -> int:
    request = urllib.request.Request(
        c.url + path,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {c.tokens[user]}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code


def test_a_device_is_revoked_from_a_laptop_only_with_devices_manage_and_the_audit_names_the_user(
    coordinator: Coordinator,  # noqa: F811 (the fixture imported above)
) -> None:
    # Prepare: a device enrolled on the coordinator's host (a live certificate)
    enrolled = coordinator.run("devices", "enroll", "pi-stolen", "--out", str(coordinator.cwd / "bundle"))
    assert enrolled.returncode == 0, enrolled.stderr
    before = (_revoked_serials(coordinator), _audit_length(coordinator))

    # Execute: refused for a viewer and an operator, and without the confirmation
    viewer = coordinator.run("devices", "revoke", "pi-stolen", token=coordinator.tokens["vi"])
    operator = coordinator.run("devices", "revoke", "pi-stolen", token=coordinator.tokens["op"])
    unconfirmed = _post(coordinator, "/api/devices/pi-stolen/revoke", {"confirm": "pi-other"}, "operator")

    # Assert: one sentence each, nothing revoked, nothing audited
    assert "vi (viewer) lacks the devices.manage permission" in _one_sentence(viewer)
    assert "op (operator) lacks the devices.manage permission" in _one_sentence(operator)
    assert unconfirmed == 422
    assert (_revoked_serials(coordinator), _audit_length(coordinator)) == before

    # Execute: the admin revokes it remotely
    done = coordinator.run("devices", "revoke", "pi-stolen", "--json", token=coordinator.tokens["operator"])

    # Assert: its serials are in the CRL on the coordinator, and the audit names the user
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["device"] == "pi-stolen" and doc["revoked"]
    assert {int(s, 16) for s in doc["revoked"]} <= _revoked_serials(coordinator)
    with coordinator.d.store() as store:
        [entry] = audit.entries(store, 1, action="device.revoke")
    assert entry["actor"] == "user:operator" and entry["subject"] == "pi-stolen"

    # Execute: again, remotely and locally
    again = coordinator.run("devices", "revoke", "pi-stolen", token=coordinator.tokens["operator"])
    local_again = coordinator.run("devices", "revoke", "pi-stolen")

    # Assert: refused in one sentence both ways, changing nothing
    for refused in (again, local_again):
        assert "no live certificate" in _one_sentence(refused)
    assert _audit_length(coordinator) == before[1] + 1


def test_a_release_shows_the_same_locally_and_remotely_and_an_unknown_one_is_refused(
    coordinator: Coordinator,  # noqa: F811 (the fixture imported above)
) -> None:
    # Prepare: a release published on the coordinator's host, with a model card
    model = coordinator.cwd / "m.tflite"
    model.write_bytes(build_dense_model(random_dense_layers([64, 16, 10], 5)))
    card = coordinator.cwd / "card.json"
    card.write_text(json.dumps({"intended_use": "digits on the bench", "owner": "lab"}))
    published = coordinator.run("release", str(model), "--name", "bench", "--version", "1.2.3", "--card", str(card))
    assert published.returncode == 0, published.stderr

    # Execute
    doc, remote_doc = coordinator.both("releases", "show", "bench@1.2.3", "--json", user="vi")
    text, remote_text = coordinator.both("releases", "show", "bench@1.2.3", user="vi")
    only_card, _ = coordinator.both("releases", "show", "bench@1.2.3", "--card", user="vi")
    missing = coordinator.run("releases", "show", "bench@9.9.9")
    remote_missing = coordinator.run("releases", "show", "bench@9.9.9", token=coordinator.tokens["vi"])

    # Assert: one document both ways, as the store and the list have it; a card; one sentence for a missing one
    assert doc == remote_doc and text == remote_text
    shown = json.loads(doc)
    with coordinator.d.store() as store:
        stored = store.release("bench@1.2.3")
    assert (shown["id"], shown["sha256"], shown["bytes"]) == (stored.id, stored.sha256, stored.length)
    assert shown["source"]["kind"] == "file" and shown["devices_running"] == 0 and shown["rollouts"] == []
    assert "- **intended_use**: digits on the bench" in shown["card_markdown"]
    assert text.startswith("bench@1.2.3 (file): published ") and stored.sha256 in text
    assert only_card.startswith("# Model card: bench@1.2.3") and stored.sha256 not in only_card
    for refused in (missing, remote_missing):
        assert "bench@9.9.9" in _one_sentence(refused)


def test_status_is_the_same_at_a_glance_locally_and_remotely(
    coordinator: Coordinator,  # noqa: F811 (the fixture imported above)
) -> None:
    # Execute
    doc, remote_doc = coordinator.both("status", "--json", user="vi")
    text, remote_text = coordinator.both("status", user="vi")

    # Assert: one document both ways, with the devices the store holds
    assert doc == remote_doc and text == remote_text
    with coordinator.d.store() as store:
        registered = len(store.devices())
    assert json.loads(doc)["devices"]["total"] == registered > 0
    assert text.startswith("coordinator  ")


def test_the_loop_reads_the_same_remotely_and_answers_need_loop_answer(
    coordinator: Coordinator,  # noqa: F811 (the fixture imported above)
) -> None:
    # Execute
    doc, remote_doc = coordinator.both("loop", "status", "--json", user="vi")
    viewer = coordinator.run("loop", "approve", "7", token=coordinator.tokens["vi"])
    missing = coordinator.run("loop", "approve", "7", token=coordinator.tokens["rm"])
    local_missing = coordinator.run("loop", "reject", "7")

    # Assert: the same (empty) record both ways; a viewer lacks loop.answer; an unknown job is one sentence
    assert doc == remote_doc and json.loads(doc) == {"alarms": [], "jobs": []}
    assert "vi (viewer) lacks the loop.answer permission" in _one_sentence(viewer)
    for refused in (missing, local_missing):
        assert "7" in _one_sentence(refused)
