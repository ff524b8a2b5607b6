"""Anchored audit: the head signed with the coordinator's audit key and exported; `audit verify --against EXPORT`
fails for a database restored from an older copy, one cut at its tail (head row and all), an altered export and
one signed by another key, and passes for the live database. serve's housekeeper exports to a file and to the
webhooks that want every event."""

from __future__ import annotations

import json
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server import audit
from server.datadir import DataDir
from server.loop.alerts import SIGNATURE_HEADER, sign
from server.loop.retention import ANCHORS_DIR, Housekeeper, export_anchor
from server.policy import Policy, Webhook
from tests.support import fedfleet


def _append(d: DataDir, n: int, start: int = 0) -> None:
    with d.store() as store:
        for i in range(start, start + n):
            audit.append(store, "test.change", f"thing-{i}", {"i": i})


def _copy_db(d: DataDir, to: Path) -> None:
    """A consistent copy of the live database (SQLite's backup API), as a backup tool would take it."""
    with sqlite3.connect(d.db_path) as src, sqlite3.connect(to) as dst:
        src.backup(dst)


def _restore_db(d: DataDir, copy: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{d.db_path}{suffix}").unlink(missing_ok=True)
    d.db_path.write_bytes(copy.read_bytes())


def _anchor(d: DataDir, out: Path, cli: bool = False) -> dict[str, Any]:
    """`fedfleet audit anchor --out OUT` (with `cli`; else the function behind it, which is quicker)."""
    if not cli:
        with d.store() as store:
            doc, path = export_anchor(store, d.keys, d.root / ANCHORS_DIR, out)
        return {**doc, "path": str(path)}
    done = fedfleet(d, "audit", "anchor", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    cli_doc: dict[str, Any] = json.loads(done.stdout)
    return cli_doc


def _verify_fails(d: DataDir, export: Path, words: str) -> None:
    done = fedfleet(d, "audit", "verify", "--against", str(export))
    assert done.returncode == 1
    assert words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_the_live_database_passes_against_its_export(datadir: DataDir, tmp_path: Path) -> None:
    _append(datadir, 5)
    doc = _anchor(datadir, tmp_path / "anchor.json", cli=True)
    assert doc["seq"] == 5 and (datadir.keys / "audit.pem").stat().st_mode & 0o777 == 0o600
    _append(datadir, 3, start=5)  # the trail goes on after the export: still consistent with it
    done = fedfleet(datadir, "audit", "verify", "--against", str(tmp_path / "anchor.json"))
    assert done.returncode == 0, done.stderr
    assert "intact: 8 entries" in done.stdout


def test_a_database_restored_from_an_older_copy_fails(datadir: DataDir, tmp_path: Path) -> None:
    _append(datadir, 4)
    _copy_db(datadir, tmp_path / "backup.db")  # the nightly backup
    _append(datadir, 3, start=4)  # the day's changes
    _anchor(datadir, tmp_path / "anchor.json", cli=True)  # exported off the machine
    _restore_db(datadir, tmp_path / "backup.db")  # someone puts last night's copy back
    assert fedfleet(datadir, "audit", "verify").returncode == 0  # the copy's own chain is intact
    _verify_fails(datadir, tmp_path / "anchor.json", "ends at entry 4 but the export of")


def test_a_trail_cut_at_its_tail_with_its_head_row_fails(datadir: DataDir, tmp_path: Path) -> None:
    _append(datadir, 6)
    _anchor(datadir, tmp_path / "anchor.json")
    with datadir.store() as store:  # the last two entries go, and the head row is moved to match
        store.db.execute("DELETE FROM audit WHERE seq > 4")
        last = store.db.execute("SELECT hash FROM audit WHERE seq = 4").fetchone()[0]
        store.db.execute("UPDATE audit_head SET seq = 4, hash = ? WHERE id = 1", [last])
        assert not audit.verify(store)[1]  # undetectable from inside the database
    _verify_fails(datadir, tmp_path / "anchor.json", "restored from an older copy or cut at its tail")


def test_a_rewritten_trail_fails(datadir: DataDir, tmp_path: Path) -> None:
    _append(datadir, 3)
    _anchor(datadir, tmp_path / "anchor.json")
    with datadir.store() as store:  # the whole trail re-chained from entry 2 on: every hash checks again
        store.db.execute("DELETE FROM audit WHERE seq > 1")
        store.db.execute("UPDATE audit_head SET seq = 1, hash = (SELECT hash FROM audit WHERE seq = 1)")
    _append(datadir, 2, start=100)
    _verify_fails(datadir, tmp_path / "anchor.json", "is not the one the export of")


@pytest.mark.parametrize(
    "tamper",
    [
        lambda doc: {**doc, "seq": doc["seq"] - 1},  # claims less than it signed
        lambda doc: {**doc, "hash": "f" * 64},
        lambda doc: {**doc, "at": doc["at"] + 1},
        lambda doc: {**doc, "signature": "00" * 64},
        lambda doc: {**doc, "signature": "not hex"},
    ],
)
def test_an_altered_export_fails(datadir: DataDir, tmp_path: Path, tamper: Any) -> None:
    _append(datadir, 3)
    doc = _anchor(datadir, tmp_path / "anchor.json")
    doc.pop("path")
    (tmp_path / "tampered.json").write_text(json.dumps(tamper(doc)))
    _verify_fails(datadir, tmp_path / "tampered.json", "is not signed by this coordinator's audit key")


def test_an_export_signed_by_another_key_fails(datadir: DataDir, tmp_path: Path) -> None:
    _append(datadir, 3)
    _anchor(datadir, tmp_path / "anchor.json")  # this coordinator's key exists
    with datadir.store() as store:
        forged = audit.anchor(store, Ed25519PrivateKey.generate())
    audit.write_anchor(forged, tmp_path / "forged.json")
    _verify_fails(datadir, tmp_path / "forged.json", "is not signed by this coordinator's audit key")


@pytest.mark.parametrize("content", ["", "[1, 2]", '{"format": "something else"}', "{not json"])
def test_an_unreadable_export_is_refused(datadir: DataDir, tmp_path: Path, content: str) -> None:
    _append(datadir, 1)
    _anchor(datadir, tmp_path / "anchor.json")
    (tmp_path / "bad.json").write_text(content)
    _verify_fails(datadir, tmp_path / "bad.json", "audit anchor export")


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:  # http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_the_housekeeper_exports_to_the_data_directory_and_webhooks(datadir: DataDir, tmp_path: Path) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        policy = Policy(webhooks=(Webhook(url, "s3cret"), Webhook(url + "/drift-only", "x", ("drift_alarm",))))
        keeper = Housekeeper(datadir.store, policy, datadir.keys, datadir.root / ANCHORS_DIR)
        _append(datadir, 2)
        with datadir.store() as store:
            first = keeper.anchor(store)
            assert keeper.anchor(store) is None  # the head did not move: nothing new to export
        _append(datadir, 1, start=2)
        with datadir.store() as store:
            second = keeper.anchor(store)
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
    assert first is not None and second is not None and first != second
    latest = datadir.root / ANCHORS_DIR / "latest.json"
    assert json.loads(latest.read_text())["seq"] == 3 == json.loads(second.read_text())["seq"]
    assert (datadir.root / ANCHORS_DIR).stat().st_mode & 0o777 == 0o700
    assert len(_Receiver.received) == 2  # only the webhook that wants every event, once per new head
    headers, body = _Receiver.received[-1]
    assert headers[SIGNATURE_HEADER] == sign("s3cret", body) and headers["X-Fedfleet-Event"] == "audit.anchor"
    (tmp_path / "from-hook.json").write_text(json.dumps(json.loads(body)["anchor"]))
    assert fedfleet(datadir, "audit", "verify", "--against", str(tmp_path / "from-hook.json")).returncode == 0


def test_verify_against_without_an_audit_key_says_so(datadir: DataDir, tmp_path: Path) -> None:
    _append(datadir, 1)
    with datadir.store() as store:
        audit.write_anchor(audit.anchor(store, Ed25519PrivateKey.generate()), tmp_path / "other.json")
    _verify_fails(datadir, tmp_path / "other.json", "this coordinator has no audit key")
    assert not (datadir.keys / "audit.pem").exists()  # verifying made none
