"""Keys offline and at rest (issue 24): the TUF root key and the root CA key on an offline directory, an online
intermediate CA that enrolls devices, online keys encrypted with a passphrase, and a director rotation that
retires the previous key. Each refusal is one sentence and changes nothing; each has its legitimate control."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import NoEncryption

from edge_agent.assignment import load_director_keys
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.reasons import Reason
from edge_agent.state import StateStore
from edge_agent.transport import GrpcTransport
from edge_agent.updater import Outcome, UpdateContext, UpdateResult, apply_assignment
from server.datadir import DataDir
from server.errors import DataDirError
from server.ingest.broker import free_port
from server.trust.director import Director
from server.trust.keyfile import ENV_PASSPHRASE, ENV_PASSPHRASE_FILE, is_encrypted, read_key
from server.trust.releases import publish_release
from tests.server.test_transport_security import Refused, _mqtt_session
from tests.support import (
    CoordinatorProcess,
    GrpcServerThread,
    Mosquitto,
    enroll_agent,
    fedfleet,
    own_topic_prefix,
    wait_for,
)

PASSPHRASE = "correct horse battery staple"


@pytest.fixture(autouse=True)
def no_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests set the passphrase themselves; one left in the environment would hide a missing-passphrase bug."""
    monkeypatch.delenv(ENV_PASSPHRASE, raising=False)
    monkeypatch.delenv(ENV_PASSPHRASE_FILE, raising=False)


def one_sentence(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedfleet: "), stderr
    return lines[0]


def snapshot_files(*dirs: Path) -> dict[str, bytes]:
    """Every file under these directories, by path: what "changes nothing" compares."""
    return {str(p): p.read_bytes() for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


def init(data: Path, usb: Path) -> subprocess.CompletedProcess[str]:
    """`fedfleet init --data-dir DATA --offline-keys USB` in a process of its own."""
    args = ["init", "--data-dir", str(data), "--offline-keys", str(usb)]
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )


def offline_datadir(tmp_path: Path) -> tuple[DataDir, Path]:
    usb = tmp_path / "usb"
    out = init(tmp_path / "data", usb)
    assert out.returncode == 0, out.stderr
    d = DataDir(tmp_path / "data")
    own_topic_prefix(d)
    return d, usb


class Device:
    """The agent's real update function against the real FleetService on a free port."""

    def __init__(self, d: DataDir, root: Path, device_id: str = "pi-keys") -> None:
        self.d, self.device_id = d, device_id
        store = d.store()
        store.register_device(device_id, "lab", {}, {}, "test")
        store.close()
        self.server_store = d.store()
        self.server = GrpcServerThread(self.server_store, d.repository())
        self.state = StateStore(root / device_id)
        self.state.seed_trust_root(d.trust / "root.json")
        self.transport = GrpcTransport(self.server.address, device_id, timeout=10)
        keys = load_director_keys(json.loads((d.trust / "director_keys.json").read_text()))
        self.ctx = UpdateContext(device_id, self.state, self.transport, keys, lambda e: None)

    def assign(self, release_id: str, director: Director | None = None) -> bytes:
        with self.d.store() as store:
            (director or self.d.director()).assign(store, [self.device_id], store.release(release_id))
            row = store.current_assignment(self.device_id)
        assert row is not None
        signed: bytes = row["signed"]
        return signed

    def apply(self, payload: bytes) -> UpdateResult:
        return apply_assignment(payload, self.ctx)

    def running(self) -> str:
        info = self.state.load().active_info
        assert info is not None
        return info.release_id

    def trusted_root_version(self) -> int:
        version: int = json.loads((self.state.tuf_dir / "root.json").read_text())["signed"]["version"]
        return version

    def close(self) -> None:
        self.transport.close()
        self.server.stop()
        self.server_store.close()


def publish(d: DataDir, model_bytes: dict[str, bytes], *versions: str) -> None:
    with d.store() as store:
        for version in versions:
            publish_release(d.repository(), store, model_bytes[version], "digits", version)


# ----- the TUF root key offline -----


def test_init_with_offline_keys_keeps_both_root_keys_out_of_the_data_directory(tmp_path: Path) -> None:
    d, usb = offline_datadir(tmp_path)
    assert sorted(p.name for p in usb.iterdir()) == ["ca-root-key.pem", "root.pem"]
    assert not (d.keys / "root.pem").exists() and not (d.keys / "ca-root-key.pem").exists()
    assert {"targets.pem", "snapshot.pem", "timestamp.pem", "director.pem", "ca-key.pem"} <= {
        p.name for p in d.keys.iterdir()
    }
    assert oct(usb.stat().st_mode & 0o777) == "0o700"
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in usb.iterdir())
    # The offline directory is not reused for another fleet, nor placed inside the data directory.
    again = init(tmp_path / "other", usb)
    assert again.returncode == 1 and "already holds" in one_sentence(again.stderr)
    assert not (tmp_path / "other").exists()
    inside = init(tmp_path / "third", tmp_path / "third" / "usb")
    assert inside.returncode == 1 and "inside the data directory" in one_sentence(inside.stderr)


def test_offline_keys_apply_only_when_the_data_directory_is_created(tmp_path: Path) -> None:
    d, _ = DataDir.init(tmp_path / "data")
    before = snapshot_files(d.keys)
    late = init(d.root, tmp_path / "usb")
    assert late.returncode == 1 and "applies when a data directory is created" in one_sentence(late.stderr)
    assert not (tmp_path / "usb").exists() and snapshot_files(d.keys) == before
    # A data directory made with offline keys initialises again without them: nothing changes.
    offline, usb = offline_datadir(tmp_path / "offline")
    again = init(offline.root, usb)
    assert again.returncode == 0, again.stderr
    assert not (offline.keys / "root.pem").exists()


def test_keys_written_with_a_passphrase_set_are_encrypted_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_PASSPHRASE, PASSPHRASE)
    d, _ = DataDir.init(tmp_path / "data", tmp_path / "usb")
    keys = sorted([*d.keys.rglob("*.pem"), *(tmp_path / "usb").glob("*.pem")])
    assert len(keys) == 7 and all(is_encrypted(p.read_bytes()) for p in keys)
    key_id = d.director().key_id  # and they open with it
    monkeypatch.delenv(ENV_PASSPHRASE)
    with pytest.raises(DataDirError, match="is encrypted; set FEDFLEET_KEY_PASSPHRASE"):
        d.director()
    monkeypatch.setenv(ENV_PASSPHRASE, "a different passphrase")
    with pytest.raises(DataDirError, match="does not open with the passphrase given"):
        d.ca()
    monkeypatch.setenv(ENV_PASSPHRASE, PASSPHRASE)
    assert d.director().key_id == key_id


@pytest.mark.slow
def test_root_rotation_with_the_root_key_offline(tmp_path: Path, model_bytes: dict[str, bytes]) -> None:
    d, usb = offline_datadir(tmp_path)
    publish(d, model_bytes, "1.0.0", "2.0.0")
    device = Device(d, tmp_path / "agents")
    try:
        assert device.apply(device.assign("digits@1.0.0")).outcome is Outcome.COMMITTED
        before = snapshot_files(d.repository_dir, d.keys, usb)

        # Without the offline directory: one sentence saying what to give, and nothing changes.
        missing = fedfleet(d, "keys", "rotate-root")
        assert missing.returncode == 1
        assert "--offline-keys DIR" in one_sentence(missing.stderr)
        # A directory without the key, and another fleet's root key: refused the same way.
        empty = tmp_path / "empty"
        empty.mkdir()
        assert "does not exist" in one_sentence(fedfleet(d, "keys", "rotate-root", "--offline-keys", str(empty)).stderr)
        _, other_usb = offline_datadir(tmp_path / "other")
        wrong = fedfleet(d, "keys", "rotate-root", "--offline-keys", str(other_usb))
        assert wrong.returncode == 1 and "is not the current TUF root key" in one_sentence(wrong.stderr)
        assert snapshot_files(d.repository_dir, d.keys, usb) == before

        # With it: root version 2, signed by the old and the new key; the new key is written to the offline
        # directory, the old one retired there; the data directory still holds no root key.
        rotated = fedfleet(d, "keys", "rotate-root", "--offline-keys", str(usb), "--json")
        assert rotated.returncode == 0, rotated.stderr
        assert json.loads(rotated.stdout)["root_version"] == 2
        assert (usb / "retired" / "root-v1.pem").read_bytes() == before[str(usb / "root.pem")]
        assert (usb / "root.pem").read_bytes() != before[str(usb / "root.pem")]
        assert not (d.keys / "root.pem").exists()

        # A device that trusts root 1 walks to root 2 and installs the next release.
        assert device.apply(device.assign("digits@2.0.0")).outcome is Outcome.COMMITTED
        assert device.running() == "digits@2.0.0" and device.trusted_root_version() == 2

        # The retired key no longer rotates the root; the current one in the offline directory does.
        stale = tmp_path / "stale-usb"
        stale.mkdir()
        shutil.copy(usb / "retired" / "root-v1.pem", stale / "root.pem")
        assert "not the current" in one_sentence(
            fedfleet(d, "keys", "rotate-root", "--offline-keys", str(stale)).stderr
        )
        assert fedfleet(d, "keys", "rotate-root", "--offline-keys", str(usb)).returncode == 0
        assert device.apply(device.assign("digits@1.0.0")).outcome is Outcome.COMMITTED
        assert device.trusted_root_version() == 3
        audit = json.loads(fedfleet(d, "audit", "list", "--json").stdout)
        assert [e["detail"]["offline"] for e in audit if e["action"] == "keys.rotate_root"] == [True, True]
    finally:
        device.close()


@pytest.mark.slow
def test_a_new_intermediate_needs_the_offline_root_ca_key(tmp_path: Path) -> None:
    d, usb = offline_datadir(tmp_path)
    first = x509.load_pem_x509_certificate((d.trust / "ca-intermediate.pem").read_bytes())
    before = snapshot_files(d.keys, d.trust)
    missing = fedfleet(d, "keys", "new-intermediate")
    assert missing.returncode == 1 and "--offline-keys DIR" in one_sentence(missing.stderr)
    _, other_usb = offline_datadir(tmp_path / "other")
    wrong = fedfleet(d, "keys", "new-intermediate", "--offline-keys", str(other_usb))
    assert wrong.returncode == 1 and "not the key of this fleet's root CA" in one_sentence(wrong.stderr)
    assert snapshot_files(d.keys, d.trust) == before

    made = fedfleet(d, "keys", "new-intermediate", "--offline-keys", str(usb), "--json")
    assert made.returncode == 0, made.stderr
    second = x509.load_pem_x509_certificate((d.trust / "ca-intermediate.pem").read_bytes())
    root = x509.load_pem_x509_certificate((d.trust / "ca-root.pem").read_bytes())
    assert second.serial_number != first.serial_number and second.issuer == root.subject
    assert second.subject != first.subject  # OpenSSL finds a leaf's CRL by its issuer's name
    second.verify_directly_issued_by(root)
    bundle = x509.load_pem_x509_certificates((d.trust / "ca.pem").read_bytes())
    assert [c.subject for c in bundle] == [root.subject, second.subject]
    assert (d.keys / "retired" / f"ca-key-{first.serial_number:x}.pem").is_file()


# ----- online keys encrypted at rest -----


@pytest.mark.slow
def test_keys_encrypt_refuses_a_missing_short_or_wrong_passphrase_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d, _ = DataDir.init(tmp_path / "data")
    plain = snapshot_files(d.keys)

    missing = fedfleet(d, "keys", "encrypt")
    assert missing.returncode == 1 and ENV_PASSPHRASE in one_sentence(missing.stderr)
    short = fedfleet(d, "keys", "encrypt", env={ENV_PASSPHRASE: "short"})
    assert short.returncode == 1 and "at least 12" in one_sentence(short.stderr)
    both = fedfleet(d, "keys", "encrypt", env={ENV_PASSPHRASE: PASSPHRASE, ENV_PASSPHRASE_FILE: "/nonexistent"})
    assert both.returncode == 1 and "set only one" in one_sentence(both.stderr)
    assert snapshot_files(d.keys) == plain

    done = fedfleet(d, "keys", "encrypt", "--json", env={ENV_PASSPHRASE: PASSPHRASE})
    assert done.returncode == 0, done.stderr
    # the root key and the root CA key too: without --offline-keys they are online
    assert len(json.loads(done.stdout)["encrypted"]) == len(plain) == 7
    keys = sorted(d.keys.rglob("*.pem"))
    assert keys and all(is_encrypted(p.read_bytes()) for p in keys)
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in keys)
    assert not list(d.keys.glob(".tmp-*"))

    # The same keys, decrypted, are the keys that were there: nothing was replaced.
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_text(PASSPHRASE + "\n")
    with_file = {ENV_PASSPHRASE_FILE: str(passphrase_file)}
    encrypted = snapshot_files(d.keys)
    monkeypatch.setenv(ENV_PASSPHRASE_FILE, str(passphrase_file))
    for path, pem in plain.items():
        key = read_key(Path(path))
        clear = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, NoEncryption())
        assert clear == pem, path
    monkeypatch.delenv(ENV_PASSPHRASE_FILE)

    # A wrong passphrase opens nothing and rewrites nothing; a command without one says what to set.
    wrong = fedfleet(d, "keys", "encrypt", env={ENV_PASSPHRASE: "not the passphrase at all"})
    assert wrong.returncode == 1 and "does not open with the passphrase" in one_sentence(wrong.stderr)
    unset = fedfleet(d, "keys", "rotate-director")
    assert unset.returncode == 1
    assert "is encrypted; set FEDFLEET_KEY_PASSPHRASE" in one_sentence(unset.stderr)
    assert snapshot_files(d.keys) == encrypted

    # Encrypting again with the right passphrase changes nothing; keys written later are encrypted too.
    again = fedfleet(d, "keys", "encrypt", "--json", env=with_file)
    assert again.returncode == 0 and json.loads(again.stdout)["encrypted"] == []
    assert snapshot_files(d.keys) == encrypted
    rotated = fedfleet(d, "keys", "rotate-director", env=with_file)
    assert rotated.returncode == 0, rotated.stderr
    assert all(is_encrypted(p.read_bytes()) for p in d.keys.rglob("*.pem"))
    assert len(list(d.keys.glob("director-retired-*.pem"))) == 1


# ----- retiring the previous director key -----


def test_a_retired_director_key_is_refused(tmp_path: Path, model_bytes: dict[str, bytes]) -> None:
    d, _ = DataDir.init(tmp_path / "data")
    publish(d, model_bytes, "1.0.0", "2.0.0")
    device = Device(d, tmp_path / "agents")
    try:
        assert device.apply(device.assign("digits@1.0.0")).outcome is Outcome.COMMITTED
        old = d.director()

        # Control: a plain rotation keeps the previous key trusted (assignments in flight stay valid).
        out = fedfleet(d, "keys", "rotate-director", "--json")
        assert out.returncode == 0, out.stderr
        middle = d.director()
        assert device.apply(device.assign("digits@2.0.0")).outcome is Outcome.COMMITTED  # learns {middle, old}
        assert set(device.ctx.director_keys) == {middle.key_id, old.key_id}
        assert device.apply(device.assign("digits@1.0.0", director=old)).outcome is Outcome.COMMITTED

        # The retiring rotation: the published set holds only the new key.
        out = fedfleet(d, "keys", "rotate-director", "--retire-previous", "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["previous_retired"] is True
        new = d.director()
        assert set(json.loads((d.trust / "director_keys.json").read_text())) == {new.key_id}

        # The new key's assignment is accepted, and the device now trusts it alone.
        assert device.apply(device.assign("digits@2.0.0")).outcome is Outcome.COMMITTED
        assert set(device.ctx.director_keys) == {new.key_id}
        learned = json.loads((device.state.director_keys_path).read_text())
        assert set(learned) == {new.key_id}

        # An assignment signed by the retired key (a higher counter, a real release) is refused, and so is one
        # from the key before it; the device keeps running what the new key assigned.
        for retired in (middle, old):
            result = device.apply(device.assign("digits@1.0.0", director=retired))
            assert result.outcome is Outcome.REJECTED and result.reason == Reason.ASSIGNMENT_UNKNOWN_KEY, result
            assert device.running() == "digits@2.0.0"
        # Control after the refusals: the new key still updates the device.
        assert device.apply(device.assign("digits@1.0.0")).outcome is Outcome.COMMITTED
        assert device.running() == "digits@1.0.0"
        audit = json.loads(fedfleet(d, "audit", "list", "--json").stdout)
        assert [e["detail"]["retired"] for e in audit if e["action"] == "keys.rotate_director"] == [True, False]
    finally:
        device.close()


def test_an_agent_that_missed_the_retiring_rotation_refuses_the_old_key(
    tmp_path: Path, model_bytes: dict[str, bytes]
) -> None:
    """The device has not met the new key yet when an assignment signed by the retired one arrives (an attacker
    who holds it signs the next counter for a release the repository signs): the TUF metadata of that very
    update names the new list, so the device learns it and refuses before it keeps the counter."""
    d, _ = DataDir.init(tmp_path / "data")
    publish(d, model_bytes, "1.0.0", "2.0.0")
    device = Device(d, tmp_path / "agents")
    try:
        assert device.apply(device.assign("digits@1.0.0")).outcome is Outcome.COMMITTED
        old = d.director()
        highest = device.state.load().highest_counter
        out = fedfleet(d, "keys", "rotate-director", "--retire-previous", "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["freshness_restated"] == 1  # the device's statement, now by the new key
        new = d.director()

        with d.store() as store:
            release = store.release("digits@2.0.0")
        body = pb.Assignment(
            device_id=device.device_id,
            target_path=release.target_path,
            target_length=release.length,
            target_sha256=release.sha256,
            counter=highest + 1,
            release_id=release.id,
            issued_at_ms=1,
        )
        forged = old.sign(body).SerializeToString()
        assert set(device.ctx.director_keys) == {old.key_id}  # nothing told the device about the rotation yet
        result = device.apply(forged)
        assert result.outcome is Outcome.REJECTED and result.reason == Reason.ASSIGNMENT_UNKNOWN_KEY, result
        assert "retired" in result.detail
        assert device.running() == "digits@1.0.0"
        assert device.state.load().highest_counter == highest  # the counter was not burned
        assert set(device.ctx.director_keys) == {new.key_id}

        # Control: the same release assigned by the new key installs.
        assert device.apply(device.assign("digits@2.0.0")).outcome is Outcome.COMMITTED
        assert device.running() == "digits@2.0.0"
    finally:
        device.close()


def test_a_retired_key_cannot_freeze_a_device_with_the_counter_of_its_real_assignment(
    tmp_path: Path, model_bytes: dict[str, bytes]
) -> None:
    """The real next assignment (new key, counter N+1, release 2.0.0) is withheld; the retired key signs counter
    N+1 for the release already running. It passes the director's statement (N+1), and if kept it would make the
    real N+1 look applied. The statement, signed by the new key, teaches the device the new list: refused."""
    d, _ = DataDir.init(tmp_path / "data")
    publish(d, model_bytes, "1.0.0", "2.0.0")
    device = Device(d, tmp_path / "agents")
    offered: list[bytes] = []
    device.ctx.offer = offered.append
    try:
        assert device.apply(device.assign("digits@1.0.0")).outcome is Outcome.COMMITTED
        old = d.director()
        highest = device.state.load().highest_counter
        assert fedfleet(d, "keys", "rotate-director", "--retire-previous").returncode == 0
        real = device.assign("digits@2.0.0")  # withheld from the device
        with d.store() as store:
            running = store.release("digits@1.0.0")
        body = pb.Assignment(
            device_id=device.device_id,
            target_path=running.target_path,
            target_length=running.length,
            target_sha256=running.sha256,
            counter=highest + 1,
            release_id=running.id,
            issued_at_ms=1,
        )
        result = device.apply(old.sign(body).SerializeToString())
        assert result.outcome is Outcome.REJECTED and result.reason == Reason.ASSIGNMENT_UNKNOWN_KEY, result
        assert device.state.load().highest_counter == highest
        assert offered == [real]  # the director's answer carried the real one
        # Control: the real assignment still installs.
        assert device.apply(real).outcome is Outcome.COMMITTED
        assert device.running() == "digits@2.0.0"
    finally:
        device.close()


# ----- real processes: the intermediate CA over mutual TLS, and serve with encrypted keys -----


@pytest.mark.broker
@pytest.mark.slow
def test_an_intermediate_issued_device_connects_to_mosquitto_and_grpc_with_mutual_tls(
    tmp_path: Path, model_bytes: dict[str, bytes]
) -> None:
    d, usb = offline_datadir(tmp_path)
    d.config_path.write_text(d.config_path.read_text().replace("grpc_tls = false", "grpc_tls = true"))
    publish(d, model_bytes, "1.0.0", "2.0.0")
    port = free_port()
    broker_dir = tmp_path / "broker"
    out = fedfleet(d, "broker", "config", "--out", str(broker_dir), "--port", str(port), "--run-as", "root")
    assert out.returncode == 0, out.stderr
    broker = Mosquitto(broker_dir, conf=broker_dir / "mosquitto.conf", port=port)
    coordinator = CoordinatorProcess(d, f"mqtts://127.0.0.1:{port}")
    agent = None
    try:
        coordinator.start()
        agent = enroll_agent(d, tmp_path / "bundles", "pi-inter", coordinator=coordinator)
        tls = agent.config.tls
        assert tls is not None and agent.config.grpc_tls and agent.config.mqtt_tls
        chain = x509.load_pem_x509_certificates(tls.cert.read_bytes())
        intermediate = x509.load_pem_x509_certificate((d.trust / "ca-intermediate.pem").read_bytes())
        assert [c.issuer for c in chain] == [intermediate.subject, intermediate.issuer]  # leaf, then its issuer
        assert chain[1] == intermediate

        # The real agent registers over gRPC (mutual TLS) and commits an assignment received over MQTT (mTLS).
        agent.start()
        wait_for(lambda: _running(d, "pi-inter") is not None, 30, what="registered over gRPC mTLS")
        assert fedfleet(d, "assign", "pi-inter", "digits@1.0.0").returncode == 0
        wait_for(lambda: _running(d, "pi-inter") == "digits@1.0.0", 60, what="committed over mTLS")

        # A new intermediate: its devices connect after the broker gets the new bundle, the earlier
        # intermediate's devices still do (their files carry their chain), and a revoked one of those does not
        # (the retired intermediate still signs its CRL).
        assert fedfleet(d, "keys", "new-intermediate", "--offline-keys", str(usb)).returncode == 0
        later = enroll_agent(d, tmp_path / "bundles", "pi-later", coordinator=coordinator).config.tls
        doomed = enroll_agent(d, tmp_path / "bundles", "pi-doomed", coordinator=coordinator).config.tls
        assert later is not None and doomed is not None
        doomed_first = x509.load_pem_x509_certificates(doomed.cert.read_bytes())[1]
        assert doomed_first.subject != intermediate.subject  # issued by the new one
        assert fedfleet(d, "devices", "revoke", "pi-doomed").returncode == 0
        out = fedfleet(d, "broker", "config", "--out", str(broker_dir), "--port", str(port), "--run-as", "root")
        assert out.returncode == 0, out.stderr
        broker.stop()
        broker.start()
        for name, files in (("pi-later", later), ("pi-inter", tls)):
            session = _mqtt_session(port, files.ca, files.cert, files.key, name)
            session.disconnect()
            session.loop_stop()
        with pytest.raises(Refused):
            _mqtt_session(port, doomed.ca, doomed.cert, doomed.key, "pi-doomed")
        transport = GrpcTransport(coordinator.endpoints["grpc"], "pi-later", timeout=10, tls=later.read())
        try:
            assert transport.register("lab", {}, "ai-edge-litert").device_id == "pi-later"
        finally:
            transport.close()
        assert fedfleet(d, "assign", "pi-inter", "digits@2.0.0").returncode == 0
        wait_for(lambda: _running(d, "pi-inter") == "digits@2.0.0", 60, what="the older device after the new CA")
    finally:
        if agent is not None:
            agent.kill()
        coordinator.kill()
        broker.stop()


def _running(d: DataDir, device_id: str) -> str | None:
    with d.store() as store:
        rows = [r for r in store.devices(None) if r["id"] == device_id]
    if not rows:
        return None
    running: str = rows[0]["running_release"] or ""
    return running


@pytest.mark.slow
def test_serve_runs_with_encrypted_online_keys(
    tmp_path: Path, model_bytes: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, _ = DataDir.init(tmp_path / "data")
    own_topic_prefix(d)
    d.config_path.write_text(d.config_path.read_text().replace("grpc_tls = false", "grpc_tls = true"))
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_text(PASSPHRASE + "\n")
    env = {ENV_PASSPHRASE_FILE: str(passphrase_file)}
    assert fedfleet(d, "keys", "encrypt", env=env).returncode == 0
    # Released after the encryption: the TUF metadata the agent verifies is signed with the encrypted keys.
    for version in ("1.0.0", "2.0.0"):
        model = tmp_path / f"model-{version}.tflite"
        model.write_bytes(model_bytes[version])
        released = fedfleet(d, "release", str(model), "--name", "digits", "--version", version, env=env)
        assert released.returncode == 0, released.stderr

    # Without the passphrase serve stops at once with the sentence that says what to set.
    refused = CoordinatorProcess(d, None)
    refused.start(wait=False)
    assert refused.proc is not None
    assert refused.proc.wait(60) != 0
    assert "is encrypted; set FEDFLEET_KEY_PASSPHRASE" in refused.log.read_text()
    assert not (d.root / "serve.json").exists()

    # With it: serve issues its gRPC server certificate with the encrypted intermediate CA key, and its rollout
    # signs the canary's assignment with the encrypted director key; the agent verifies both and commits.
    coordinator = CoordinatorProcess(d, None, env=env)
    agent = None
    try:
        coordinator.start()
        busy = fedfleet(d, "keys", "encrypt", env=env)  # under a running serve: refused, it re-reads keys as it signs
        assert busy.returncode == 1 and "stop it, encrypt" in one_sentence(busy.stderr)
        monkeypatch.setenv(ENV_PASSPHRASE_FILE, str(passphrase_file))  # enrolling signs with the intermediate CA key
        agent = enroll_agent(d, tmp_path / "bundles", "pi-enc", coordinator=coordinator)
        assert agent.config.grpc_tls
        agent.start()
        wait_for(lambda: _running(d, "pi-enc") is not None, 30, what="registered over gRPC mTLS")
        assert fedfleet(d, "assign", "pi-enc", "digits@1.0.0", env=env).returncode == 0
        wait_for(lambda: _running(d, "pi-enc") == "digits@1.0.0", 60, what="the first release committed")
        started = fedfleet(d, "rollout", "start", "digits@2.0.0", "--fleet", "lab", "--canary", "1", env=env)
        assert started.returncode == 0, started.stderr
        wait_for(lambda: _running(d, "pi-enc") == "digits@2.0.0", 60, what="the rollout's canary committed")
        with d.store() as store:
            row = store.current_assignment("pi-enc")
        assert row is not None and row["rollout_id"]  # signed by serve's rollout, not by a CLI command
        assert pb.SignedAssignment.FromString(row["signed"]).key_id == d.director().key_id
    finally:
        if agent is not None:
            agent.kill()
        coordinator.kill()
    assert all(is_encrypted(p.read_bytes()) for p in d.keys.rglob("*.pem"))  # nothing was written in the clear
