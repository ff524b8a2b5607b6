"""Transport security against a real Mosquitto started from `fedfleet broker config` and a coordinator with
mutual TLS on gRPC: who may talk at all, and that a device can speak only for itself."""

from __future__ import annotations

import json
import queue
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from edge_agent.contract import LIMITS, Topics
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.errors import AgentError
from edge_agent.transport import GrpcTransport
from server.datadir import DataDir
from server.ingest.broker import free_port
from server.trust.pki import FleetCA
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers
from tests.support import (
    AgentProcess,
    CoordinatorProcess,
    Mosquitto,
    enroll_agent,
    fedfleet,
    own_topic_prefix,
    wait_for,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@dataclass
class SecureFleet:
    d: DataDir
    broker: Mosquitto
    broker_dir: Path
    coordinator: CoordinatorProcess
    bundles: Path
    topics: Topics

    @property
    def mqtts(self) -> str:
        return f"mqtts://127.0.0.1:{self.broker.port}"

    def enroll(self, device_id: str) -> AgentProcess:
        return enroll_agent(self.d, self.bundles, device_id, coordinator=self.coordinator)

    def store_rows(self, sql: str, args: list[object]) -> list[dict[str, object]]:
        store = self.d.store()
        try:
            return list(store.db.query(sql, args))
        finally:
            store.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[SecureFleet]:
    """A broker and a coordinator of this test's own: tests restart them, revoke devices and rotate keys."""
    root = tmp_path / "secure"
    d, _ = DataDir.init(root / "data")
    topics = own_topic_prefix(d)
    d.config_path.write_text(d.config_path.read_text().replace("grpc_tls = false", "grpc_tls = true"))
    store = d.store()
    publish_release(d.repository(), store, build_dense_model(random_dense_layers([64, 16, 10], 1)), "digits", "1.0.0")
    store.close()
    port = free_port()
    out = fedfleet(d, "broker", "config", "--out", str(root / "broker"), "--port", str(port), "--run-as", "root")
    assert out.returncode == 0, out.stderr
    broker = Mosquitto(root / "broker", conf=root / "broker" / "mosquitto.conf", port=port)
    try:
        coordinator = CoordinatorProcess(d, f"mqtts://127.0.0.1:{port}").start()
        try:
            yield SecureFleet(d, broker, root / "broker", coordinator, root / "bundles", topics)
        finally:
            coordinator.kill()
    finally:
        broker.stop()


class Refused(Exception):
    """The broker would not have this client: it failed the TLS handshake, or closed or refused the connection
    before accepting it."""


def _mqtt_session(
    port: int, ca: Path, cert: Path | None, key: Path | None, name: str, client_id: str | None = None
) -> paho.Client:
    """A connected paho client with these credentials. Raises Refused when the broker refuses them; fails the
    test when the broker neither accepts nor refuses within 10 s (a hang is not a refusal)."""
    client_id = client_id or f"test-{name}-{time.monotonic_ns()}"
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.tls_set(ca_certs=str(ca), certfile=str(cert) if cert else None, keyfile=str(key) if key else None)
    outcome: queue.Queue[str] = queue.Queue()
    client.on_connect = lambda c, u, f, rc, p: outcome.put("accepted" if rc == 0 else f"CONNACK {rc}")
    client.on_disconnect = lambda c, u, f, rc, p: outcome.put(f"closed before accepting ({rc})")
    try:
        client.connect("127.0.0.1", port, keepalive=10)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:  # not ConnectionRefused: a broker is down
        raise Refused(f"TLS handshake refused: {e}") from e
    client.loop_start()
    try:
        result = outcome.get(timeout=10)
    except queue.Empty:
        result = "no answer"
    if result != "accepted":
        client.disconnect()
        client.loop_stop()
        if result == "no answer":
            raise AssertionError(f"the broker neither accepted nor refused {name!r} within 10 s")
        raise Refused(result)
    return client


def test_an_enrolled_agent_updates_over_mutual_tls_on_both_transports(fleet: SecureFleet) -> None:
    agent = fleet.enroll("pi-secure")
    assert agent.config.mqtt_tls and agent.config.grpc_tls
    agent.start()
    try:
        wait_for(lambda: fleet.store_rows("SELECT id FROM devices WHERE id = 'pi-secure'", []), 30, what="register")
        assert fedfleet(fleet.d, "assign", "pi-secure", "digits@1.0.0").returncode == 0
        wait_for(
            lambda: fleet.store_rows(
                "SELECT id FROM devices WHERE id = 'pi-secure' AND running_release = 'digits@1.0.0'", []
            ),
            30,
            what="committed over TLS",
        )
    finally:
        agent.kill()


def test_broker_refuses_no_certificate_a_foreign_ca_and_a_revoked_device(fleet: SecureFleet, tmp_path: Path) -> None:
    good = fleet.enroll("pi-good").config.tls
    assert good is not None
    port = fleet.broker.port
    ok = _mqtt_session(port, good.ca, good.cert, good.key, "good")  # the control: valid credentials connect
    ok.disconnect()
    ok.loop_stop()
    with pytest.raises(Refused):
        _mqtt_session(port, good.ca, None, None, "anonymous")

    foreign = FleetCA.open(tmp_path / "keys", tmp_path / "trust").issue("pi-good", client=True)
    (tmp_path / "f.pem").write_bytes(foreign.cert_pem)
    (tmp_path / "f-key.pem").write_bytes(foreign.key_pem)
    with pytest.raises(Refused):
        _mqtt_session(port, good.ca, tmp_path / "f.pem", tmp_path / "f-key.pem", "foreign")

    doomed = fleet.enroll("pi-doomed").config.tls
    assert doomed is not None
    revoked = fedfleet(fleet.d, "devices", "revoke", "pi-doomed")
    assert revoked.returncode == 0, revoked.stderr
    port_args = ["--port", str(port), "--run-as", "root"]
    assert fedfleet(fleet.d, "broker", "config", "--out", str(fleet.broker_dir), *port_args).returncode == 0
    connections = fleet.coordinator.log.read_text().count("connected to MQTT broker")
    fleet.broker.stop()
    fleet.broker.start()  # Mosquitto reads the CRL when it starts
    wait_for(
        lambda: fleet.coordinator.log.read_text().count("connected to MQTT broker") > connections,
        30,
        what="the coordinator back on the restarted broker",
    )
    with pytest.raises(Refused):
        _mqtt_session(port, doomed.ca, doomed.cert, doomed.key, "revoked")
    still = _mqtt_session(port, good.ca, good.cert, good.key, "good-again")
    still.disconnect()
    still.loop_stop()
    again = fedfleet(fleet.d, "devices", "revoke", "pi-doomed")
    assert again.returncode == 1 and "no live certificate" in again.stderr
    actions = [e["action"] for e in json.loads(fedfleet(fleet.d, "audit", "list", "--json").stdout)]
    assert "device.revoke" in actions


def _transport(fleet: SecureFleet, device: str, tls: tuple[bytes, bytes, bytes] | None) -> GrpcTransport:
    return GrpcTransport(fleet.coordinator.endpoints["grpc"], device, timeout=5, tls=tls)


def test_grpc_takes_identity_from_the_certificate_and_refuses_strangers(fleet: SecureFleet, tmp_path: Path) -> None:
    a = fleet.enroll("pi-a").config.tls
    assert a is not None
    creds = a.read()
    ok = _transport(fleet, "pi-a", creds)
    assert ok.register("lab", {}, "ai-edge-litert").device_id == "pi-a"  # the control
    ok.close()

    impostor = _transport(fleet, "pi-b", creds)  # A's certificate, B's name in the body
    with pytest.raises(AgentError, match="cannot speak for 'pi-b'"):
        impostor.register("lab", {}, "ai-edge-litert")
    event = pb.UpdateEvent(device_id="pi-b", kind=pb.EVENT_KIND_COMMITTED, release_id="digits@1.0.0")
    with pytest.raises(AgentError, match="cannot speak for 'pi-b'"):
        impostor.report_events([event])
    with pytest.raises(AgentError, match="cannot speak for 'pi-b'"):
        list(impostor.fetch_metadata_bundle(1))
    impostor.close()
    assert fleet.store_rows("SELECT id FROM devices WHERE id = 'pi-b'", []) == []
    assert fleet.store_rows("SELECT id FROM events WHERE device_id = 'pi-b'", []) == []

    plaintext = _transport(fleet, "pi-a", None)
    with pytest.raises(AgentError):
        plaintext.register("lab", {}, "ai-edge-litert")
    plaintext.close()
    foreign = FleetCA.open(tmp_path / "keys", tmp_path / "trust").issue("pi-a", client=True)
    stranger = _transport(fleet, "pi-a", (creds[0], foreign.cert_pem, foreign.key_pem))
    with pytest.raises(AgentError):
        stranger.register("lab", {}, "ai-edge-litert")
    stranger.close()

    gone = fleet.enroll("pi-gone").config.tls
    assert gone is not None and fedfleet(fleet.d, "devices", "revoke", "pi-gone").returncode == 0
    revoked = _transport(fleet, "pi-gone", gone.read())
    with pytest.raises(AgentError, match="revoked"):
        revoked.register("lab", {}, "ai-edge-litert")
    revoked.close()
    assert fleet.store_rows("SELECT id FROM devices WHERE id IN ('pi-gone')", []) == []


def test_acl_a_device_speaks_and_listens_only_for_itself(fleet: SecureFleet) -> None:
    a, b = fleet.enroll("pi-acl-a").config, fleet.enroll("pi-acl-b").config
    assert a.tls is not None and b.tls is not None
    for config in (a, b):  # both registered, both assigned: each has a retained desired state
        t = _transport(fleet, config.device_id, config.tls.read())  # type: ignore[union-attr]
        t.register("lab", {}, "ai-edge-litert")
        t.close()
        assert fedfleet(fleet.d, "assign", config.device_id, "digits@1.0.0").returncode == 0
    topics = fleet.topics
    # Only the coordinator's identity reads every topic, and its session is the coordinator's own (client id =
    # certificate name): what A did is judged from A's own desired state and from the coordinator's database.
    mallory = _mqtt_session(fleet.broker.port, a.tls.ca, a.tls.cert, a.tls.key, "pi-acl-a")
    seen: list[tuple[str, bytes]] = []
    mallory.on_message = lambda c, u, m: seen.append((m.topic, m.payload))
    mallory.subscribe(topics.desired("pi-acl-b"), qos=1)  # B's desired state: not A's to read
    mallory.subscribe(topics.desired("pi-acl-a"), qos=1)  # its own: allowed (the control), retained after B's
    wait_for(lambda: seen, 10, what="A's own desired state")
    [(_, signed)] = seen
    forged_status = pb.DeviceStatus(device_id="pi-acl-b", online=True, running_release="evil@6.6.6")
    forged_window = pb.TelemetryWindow(device_id="pi-acl-b", sequence=1, first_sequence=1, release_id="digits@1.0.0")
    for topic, payload in (
        (topics.status("pi-acl-b"), forged_status.SerializeToString()),
        (topics.telemetry("pi-acl-b"), forged_window.SerializeToString()),
        (topics.events("pi-acl-b"), pb.UpdateEvent(device_id="pi-acl-b", kind=5).SerializeToString()),
        (topics.desired("pi-acl-a"), b"forged desired state"),
        (topics.desired("pi-acl-b"), b"forged desired state"),
    ):
        mallory.publish(topic, payload, qos=1).wait_for_publish(5)
    # Then, on the same connection, what A may say about itself. The broker and the coordinator keep the
    # order of one client's messages, so once these are seen, anything A got through as B was seen before.
    own = pb.DeviceStatus(device_id="pi-acl-a", online=True, running_release="digits@1.0.0", running_counter=1)
    own_window = pb.TelemetryWindow(device_id="pi-acl-a", sequence=1, first_sequence=1, release_id="digits@1.0.0")
    mallory.publish(topics.telemetry("pi-acl-a"), own_window.SerializeToString(), qos=1).wait_for_publish(5)
    mallory.publish(topics.status("pi-acl-a"), own.SerializeToString(), qos=1, retain=True).wait_for_publish(5)
    wait_for(  # A's own status arrives at the coordinator (the channel works) ...
        lambda: fleet.store_rows("SELECT id FROM devices WHERE id = 'pi-acl-a' AND online = 1", []), 10
    )
    wait_for(  # ... A's own window was taken in by a telemetry flush, stored or refused on its merits ...
        lambda: (
            fleet.store_rows("SELECT * FROM telemetry WHERE device_id = 'pi-acl-a'", [])
            or "rejected telemetry window from pi-acl-a" in fleet.coordinator.log.read_text()
        ),
        10,
        what="A's own telemetry window handled",
    )
    # ... and nothing A said as B was stored, nor did A hear B's desired state.
    b_row = fleet.store_rows("SELECT running_release, online FROM devices WHERE id = 'pi-acl-b'", [])
    assert b_row == [{"running_release": "", "online": 0}]
    assert fleet.store_rows("SELECT * FROM telemetry WHERE device_id = 'pi-acl-b'", []) == []
    assert fleet.store_rows("SELECT * FROM events WHERE device_id = 'pi-acl-b'", []) == []
    assert [topic for topic, _ in seen] == [topics.desired("pi-acl-a")]
    mallory.disconnect()
    mallory.loop_stop()
    # A's retained desired state is still the coordinator's signed one: the forged one was dropped.
    again = _mqtt_session(fleet.broker.port, a.tls.ca, a.tls.cert, a.tls.key, "pi-acl-a again")
    retained: list[bytes] = []
    again.on_message = lambda c, u, m: retained.append(m.payload)
    again.subscribe(topics.desired("pi-acl-a"), qos=1)
    wait_for(lambda: retained, 10, what="A's retained desired state")
    assert retained == [signed]
    again.disconnect()
    again.loop_stop()


def test_a_device_cannot_take_over_another_clients_session(fleet: SecureFleet) -> None:
    """Mosquitto ends the older session of a client id that connects again; the client id is the certificate's
    name, so A claiming B's id (or the coordinator's) gets a session of its own and B's goes on."""
    a, b = fleet.enroll("pi-take-a").config, fleet.enroll("pi-take-b").config
    assert a.tls is not None and b.tls is not None
    t = _transport(fleet, "pi-take-a", a.tls.read())
    t.register("lab", {}, "ai-edge-litert")  # known to the coordinator, so its status is taken in
    t.close()
    port, topics = fleet.broker.port, fleet.topics
    lost: list[str] = []
    victim = _mqtt_session(port, b.tls.ca, b.tls.cert, b.tls.key, "victim", client_id="pi-take-b")
    victim.on_disconnect = lambda c, u, f, rc, p: lost.append(str(rc))
    connected_before = fleet.coordinator.log.read_text().count("connected to MQTT broker")
    thief = _mqtt_session(port, a.tls.ca, a.tls.cert, a.tls.key, "thief", client_id="pi-take-b")
    status = pb.DeviceStatus(device_id="pi-take-b").SerializeToString()
    victim.publish(topics.status("pi-take-b"), status, qos=1).wait_for_publish(5)  # B's session still works
    assert lost == []
    thief.disconnect()
    thief.loop_stop()
    thief = _mqtt_session(port, a.tls.ca, a.tls.cert, a.tls.key, "thief", client_id="fedfleet-coordinator")
    own = pb.DeviceStatus(device_id="pi-take-a", online=True)
    thief.publish(topics.status("pi-take-a"), own.SerializeToString(), qos=1, retain=True).wait_for_publish(5)
    # The coordinator kept its session: it hears A's own status, and never had to connect again.
    wait_for(lambda: fleet.store_rows("SELECT id FROM devices WHERE id = 'pi-take-a' AND online = 1", []), 10)
    assert fleet.coordinator.log.read_text().count("connected to MQTT broker") == connected_before
    for client in (victim, thief):
        client.disconnect()
        client.loop_stop()


def test_rotations_keep_running_agents_working_and_updating(fleet: SecureFleet) -> None:
    d = fleet.d
    store = d.store()
    publish_release(d.repository(), store, build_dense_model(random_dense_layers([64, 16, 10], 2)), "digits", "2.0.0")
    store.close()
    agents = [fleet.enroll(f"pi-rot-{i}").start() for i in range(2)]
    names = [a.config.device_id for a in agents]

    def all_run(release: str) -> bool:
        rows = fleet.store_rows(
            f"SELECT id FROM devices WHERE running_release = ? AND id IN ({','.join('?' * len(names))})",
            [release, *names],
        )
        return len(rows) == len(names)

    def assign(release: str) -> None:
        for name in names:
            out = fedfleet(d, "assign", name, release)
            assert out.returncode == 0, out.stderr
        wait_for(lambda: all_run(release), 60, 0.2, what=f"{release} on every device")

    try:
        wait_for(lambda: len(fleet.store_rows("SELECT id FROM devices WHERE id LIKE 'pi-rot-%'", [])) == 2, 30)
        assign("digits@1.0.0")
        first_key = json.loads((d.trust / "director_keys.json").read_text())

        # 1. The director key: agents learn the new one through TUF, no re-provisioning.
        assert fedfleet(d, "keys", "rotate-director").returncode == 0
        assign("digits@2.0.0")
        learned = json.loads((agents[0].config.state_dir / "director_keys.json").read_text())
        assert set(first_key) < set(learned)  # the new key, and the old one until the next rotation
        assert fedfleet(d, "keys", "rotate-director").returncode == 0
        assign("digits@1.0.0")
        assert not set(first_key) & set(json.loads((agents[0].config.state_dir / "director_keys.json").read_text()))

        # 2. The TUF root, and the online key that signs each release's role.
        assert fedfleet(d, "keys", "rotate-root").returncode == 0
        assign("digits@2.0.0")
        rotated = fedfleet(d, "keys", "rotate-releases", "--json")
        assert rotated.returncode == 0 and json.loads(rotated.stdout) == {"roles_resigned": 2}, rotated.stderr
        assign("digits@1.0.0")

        # 3. The gRPC server certificate and the broker certificate (devices trust the CA, not the leaves).
        for name in ("grpc-server",):
            for path in d.tls_files(name):
                path.unlink()
        fleet.coordinator.kill()
        fleet.coordinator.start()
        port_args = [
            "--port",
            str(fleet.broker.port),
            "--run-as",
            "root",
            "--host",
            "127.0.0.1",
            "--host",
            "broker.lan",
        ]
        assert fedfleet(d, "broker", "config", "--out", str(fleet.broker_dir), *port_args).returncode == 0
        fleet.broker.stop()
        fleet.broker.start()
        assign("digits@2.0.0")
        actions = {e["action"] for e in json.loads(fedfleet(d, "audit", "list", "--limit", "500", "--json").stdout)}
        assert {"keys.rotate_director", "keys.rotate_root", "keys.rotate_releases"} <= actions
    finally:
        for agent in agents:
            agent.kill()


def test_oversized_and_stalled_mqtt_clients_do_not_stop_service_to_others(fleet: SecureFleet) -> None:
    a = fleet.enroll("pi-big").config.tls
    assert a is not None
    port = fleet.broker.port
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]  # never finish a handshake
    for s in stalled[:10]:
        s.sendall(b"\x16\x03\x01")  # the first bytes of a TLS record, then nothing
    big = _mqtt_session(port, a.ca, a.cert, a.key, "pi-big")
    dropped = threading.Event()
    big.on_disconnect = lambda c, u, f, rc, p: dropped.set()
    window = pb.TelemetryWindow(device_id="pi-big", sequence=1, first_sequence=1, release_id="digits@1.0.0")
    payload = window.SerializeToString() + b"\x00" * (LIMITS.mqtt_telemetry_payload + 8192)
    big.publish(fleet.topics.telemetry("pi-big"), payload, qos=1)
    assert dropped.wait(10), "the broker kept a client that sent an oversized packet"
    big.loop_stop()
    try:
        # Others are served meanwhile: a device connects and its status is stored.
        ok = _mqtt_session(port, a.ca, a.cert, a.key, "pi-big-again")
        status = pb.DeviceStatus(device_id="pi-big", online=True, running_release="digits@1.0.0")
        transport = _transport(fleet, "pi-big", a.read())
        transport.register("lab", {}, "ai-edge-litert")
        transport.close()
        ok.publish(fleet.topics.status("pi-big"), status.SerializeToString(), qos=1).wait_for_publish(5)
        wait_for(lambda: fleet.store_rows("SELECT id FROM devices WHERE id = 'pi-big' AND online = 1", []), 10)
        ok.disconnect()
        ok.loop_stop()
        assert fleet.store_rows("SELECT * FROM telemetry WHERE device_id = 'pi-big'", []) == []
    finally:
        for s in stalled:
            s.close()
