"""Hostile input, fuzzed with Hypothesis for a bounded number of examples: the MQTT message handlers (status,
events, telemetry) and the gRPC handlers of a real server. Nothing crashes, nothing malformed is stored, nothing
piles up in the handlers' buffers, a valid message is still accepted after the fuzzing (the positive control: a
handler that refused everything would fail), and a stalled or oversized client is cut off while others are
served."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.contract import LIMITS, Topics
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2_grpc as pb_grpc
from edge_agent.contract.windows import counts_from_proto, window_to_proto
from server.datadir import DataDir
from server.ingest.events import EventRejected, event_row
from server.ingest.mqtt_bridge import MqttBridge
from server.ingest.mqtt_codec import Message
from server.store import Store
from tests.agent.test_telemetry import digits_reference, window
from tests.support import GrpcServerThread

TOPICS = Topics()
UPLOAD_SECONDS = 2.0  # the server's limit on one telemetry upload, short here
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

ids = st.one_of(st.sampled_from(["pi-1", "pi-2", "ghost", ""]), st.text(max_size=200))
windows = st.builds(
    pb.TelemetryWindow,
    device_id=ids,
    sequence=st.integers(0, 2**63 - 1),
    first_sequence=st.integers(0, 2**63 - 1),
    release_id=st.sampled_from(["digits@1.0.0", "nope@0", ""]),
    start_ms=st.integers(0, 2**62),
    end_ms=st.integers(0, 2**62),
    inferences=st.integers(0, 2**63 - 1),
    errors=st.integers(0, 2**63 - 1),
    bins_per_feature=st.integers(0, 2**31),
    feature_bins=st.lists(st.integers(0, 2**62), max_size=50),
    feature_nan=st.lists(st.integers(0, 2**62), max_size=5),
    feature_out_of_range=st.lists(st.integers(0, 2**62), max_size=5),
    score_counts=st.lists(st.integers(0, 2**62), max_size=12),
    class_counts=st.lists(st.integers(0, 2**62), max_size=12),
)


@pytest.fixture
def store(lab_store: Store) -> Store:
    return lab_store


def _valid_window(device: str, sequence: int) -> pb.TelemetryWindow:
    """A window the coordinator stores: real counts from the agent's own recorder."""
    return window_to_proto(window(digits_reference(), 20, sequence), device, sequence, sequence)


def _stored_is_sound(store: Store) -> None:
    """Whatever was stored came from a registered device (fuzzed registrations included) and decodes into
    consistent counts."""
    registered = {r[0] for r in store.db.execute("SELECT id FROM devices")}
    for device, payload in store.db.execute("SELECT device_id, payload FROM telemetry"):
        assert device in registered
        counts_from_proto(pb.TelemetryWindow.FromString(payload))
    for (device,) in store.db.execute("SELECT device_id FROM events"):
        assert device in registered


def test_mqtt_handlers_survive_random_topics_and_payloads(store: Store) -> None:
    bridge = MqttBridge(store, "mqtt://127.0.0.1:1", TOPICS)
    topics = st.one_of(
        st.sampled_from(
            [TOPICS.status(d) for d in ("pi-1", "pi-2", "ghost")]
            + [TOPICS.events(d) for d in ("pi-1", "ghost")]
            + [TOPICS.telemetry(d) for d in ("pi-1", "ghost")]
            + [TOPICS.desired("pi-1"), "fedfleet/v1/devices/+/status"]
        ),
        st.text(max_size=300),
    )
    payloads = st.one_of(
        st.binary(max_size=4096),
        windows.map(lambda w: w.SerializeToString()),
        st.builds(pb.UpdateEvent, device_id=ids, kind=st.integers(0, 20), reason=st.text(max_size=100)).map(
            lambda e: e.SerializeToString()
        ),
        st.builds(pb.DeviceStatus, device_id=ids, running_release=st.text(max_size=300)).map(
            lambda s: s.SerializeToString()
        ),
        st.just(b"\xff" * (LIMITS.mqtt_telemetry_payload + 1)),
    )

    @FUZZ
    @given(topic=topics, payload=payloads)
    def one(topic: str, payload: bytes) -> None:
        bridge.receive([Message(topic, payload, 1)])  # never raises: stores or logs a refusal
        bridge.flush_telemetry()

    one()
    _stored_is_sound(store)
    # Nothing piles up: the telemetry buffer is empty after each flush, and watermarks wait only for devices
    # that exist (a count, not this machine's memory figures).
    assert bridge._telemetry == []
    assert set(bridge._pending_acks) <= {r[0] for r in store.db.execute("SELECT id FROM devices")}

    # The positive control: after all that, valid messages on each topic are accepted and stored.
    before = store.count_events()
    status = pb.DeviceStatus(device_id="pi-2", online=True, running_release="digits@1.0.0", running_counter=1)
    assert bridge.handle(TOPICS.status("pi-2"), status.SerializeToString())
    assert bridge.flush_messages() == 1
    assert store.db.execute("SELECT running_release FROM devices WHERE id = 'pi-2'").fetchone()[0] == "digits@1.0.0"
    event = pb.UpdateEvent(device_id="pi-2", kind=pb.EVENT_KIND_COMMITTED, release_id="digits@1.0.0", counter=1)
    assert bridge.handle(TOPICS.events("pi-2"), event.SerializeToString())
    assert bridge.flush_messages() == 1
    assert store.count_events() == before + 1
    top = store.db.execute("SELECT max(sequence) FROM telemetry WHERE device_id = 'pi-2'").fetchone()[0] or 0
    assert bridge.handle(TOPICS.telemetry("pi-2"), _valid_window("pi-2", top + 1).SerializeToString())
    assert bridge.flush_telemetry() == 1
    assert store.db.execute("SELECT max(sequence) FROM telemetry WHERE device_id = 'pi-2'").fetchone()[0] == top + 1


@FUZZ
@given(events=st.lists(st.builds(pb.UpdateEvent, device_id=ids, kind=st.integers(0, 30), detail=st.text()), max_size=5))
def test_event_rows_are_checked_before_storing(store: Store, events: list[pb.UpdateEvent]) -> None:
    rows = []
    for e in events:
        try:
            rows.append(event_row(e, None, store))
        except EventRejected:
            continue
    store.record_events(rows, via="fuzz")
    _stored_is_sound(store)


def test_event_rows_accept_a_valid_event(store: Store) -> None:
    """The positive control of the fuzz test above: a well-formed event from a registered device is stored."""
    event = pb.UpdateEvent(device_id="pi-1", kind=pb.EVENT_KIND_INSTALLED, release_id="digits@1.0.0", counter=2)
    store.record_events([event_row(event, "pi-1", store)], via="fuzz")
    assert [(e["device_id"], e["kind"]) for e in store.events()] == [("pi-1", "installed")]


@pytest.fixture
def server(datadir: DataDir, store: Store) -> Iterator[GrpcServerThread]:
    s = GrpcServerThread(store, datadir.repository(), upload_seconds=UPLOAD_SECONDS)
    yield s
    s.stop()


# Codes a handler may answer with; UNKNOWN or INTERNAL would mean an exception escaped a handler.
EXPECTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def test_grpc_handlers_answer_random_requests_with_clear_codes(
    server: GrpcServerThread, store: Store, datadir: DataDir
) -> None:
    channel = server.channel()
    stub = pb_grpc.FleetServiceStub(channel)
    labels = st.dictionaries(st.text(max_size=80), st.text(max_size=300), max_size=40)
    requests = st.one_of(
        st.builds(pb.RegisterRequest, device_id=ids, fleet=ids, labels=labels, agent_version=st.text(max_size=200)).map(
            lambda r: ("Register", r)
        ),
        st.builds(pb.FetchRequest, device_id=ids, path=st.text(max_size=300), offset=st.integers(0, 2**63 - 1)).map(
            lambda r: ("FetchMetadata", r)
        ),
        st.builds(pb.FetchRequest, device_id=ids, path=st.text(max_size=300), offset=st.integers(0, 2**63 - 1)).map(
            lambda r: ("FetchTarget", r)
        ),
        st.builds(pb.MetadataBundleRequest, device_id=ids, root_version=st.integers(0, 2**64 - 1)).map(
            lambda r: ("FetchMetadataBundle", r)
        ),
        st.lists(st.builds(pb.UpdateEvent, device_id=ids, kind=st.integers(0, 30)), max_size=3).map(
            lambda e: ("ReportEvents", pb.ReportEventsRequest(events=e))
        ),
        st.lists(windows, min_size=0, max_size=3).map(lambda w: ("UploadTelemetry", w)),
    )

    @settings(max_examples=200, deadline=None)
    @given(request=requests)
    def one(request: tuple[str, object]) -> None:
        method, message = request
        try:
            call = getattr(stub, method)
            if method.startswith("Fetch"):
                list(call(message, timeout=10))
            elif method == "UploadTelemetry":
                call(iter(message), timeout=10)  # type: ignore[call-overload]
            else:
                call(message, timeout=10)
        except grpc.RpcError as e:
            assert e.code() in EXPECTED, (method, e.code(), e.details())

    one()
    _stored_is_sound(store)
    registered = {r[0] for r in store.db.execute("SELECT id FROM devices")}
    assert all(len(d) <= LIMITS.id_length for d in registered)

    # The positive control: after all that, the same server accepts valid requests of each kind.
    assert stub.Register(pb.RegisterRequest(device_id="pi-ok", fleet="lab"), timeout=10).device_id == "pi-ok"
    event = pb.UpdateEvent(device_id="pi-ok", kind=pb.EVENT_KIND_COMMITTED, release_id="digits@1.0.0", counter=1)
    stub.ReportEvents(pb.ReportEventsRequest(events=[event]), timeout=10)
    assert [e["kind"] for e in store.events("pi-ok")] == ["committed"]
    stub.UploadTelemetry(iter([_valid_window("pi-ok", 1)]), timeout=10)
    assert store.db.execute("SELECT count(*) FROM telemetry WHERE device_id = 'pi-ok'").fetchone()[0] == 1
    root = b"".join(c.data for c in stub.FetchMetadata(pb.FetchRequest(path="1.root.json"), timeout=10))
    assert root and root == (datadir.repository_dir / "metadata" / "1.root.json").read_bytes()
    channel.close()


def test_oversized_and_stalled_grpc_clients_are_cut_off_while_others_are_served(server: GrpcServerThread) -> None:
    channel = server.channel()
    stub = pb_grpc.FleetServiceStub(channel)
    huge = pb.RegisterRequest(device_id="pi-1", fleet="lab", agent_version="x" * (LIMITS.grpc_request + 1))
    with pytest.raises(grpc.RpcError) as oversized:
        stub.Register(huge, timeout=10)
    assert oversized.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # A slow-loris upload: opens the stream and never finishes it.
    release = threading.Event()

    def stall() -> Iterator[pb.TelemetryWindow]:
        release.wait(600)
        yield pb.TelemetryWindow()

    stalled = stub.UploadTelemetry.future(stall(), timeout=600)
    # And a raw TCP connection that sends half an HTTP/2 preface and then nothing.
    host, port = server.address.rsplit(":", 1)
    loris = socket.create_connection((host, int(port)))
    loris.sendall(b"PRI * HTTP/2.0\r\n")
    try:
        for _ in range(3):  # others are served meanwhile
            assert stub.Register(pb.RegisterRequest(device_id="pi-2", fleet="lab"), timeout=5).device_id == "pi-2"
        with pytest.raises(grpc.RpcError) as cut:
            stalled.result(timeout=UPLOAD_SECONDS + 30)
        assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        release.set()
        stalled.cancel()
        loris.close()
        channel.close()
