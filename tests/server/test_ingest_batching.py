"""The MQTT bridge stores device messages in batches (server/ingest/mqtt_bridge.py): the messages of one read are
one transaction, stored whole and in arrival order or not at all, and telemetry is acknowledged only once stored."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import aiomqtt
import pytest

from edge_agent.contract import LIMITS, Topics
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.windows import window_to_proto
from server.ingest.mqtt_bridge import MqttBridge
from server.ingest.mqtt_codec import Message
from server.store import Store
from simulations.processes import Mosquitto
from tests.agent.test_telemetry import digits_reference, window

TOPICS = Topics("fedfleet/v1")
KINDS = [pb.EVENT_KIND_DOWNLOADING, pb.EVENT_KIND_VERIFIED, pb.EVENT_KIND_INSTALLED, pb.EVENT_KIND_COMMITTED]


@pytest.fixture
def store(lab_store: Store) -> Store:
    return lab_store


def _event(device: str, kind: int, counter: int = 1) -> bytes:
    return pb.UpdateEvent(device_id=device, kind=kind, release_id="digits@1.0.0", counter=counter).SerializeToString()


def _status(device: str, release: str) -> bytes:
    return pb.DeviceStatus(device_id=device, online=True, running_release=release).SerializeToString()


def _events(store: Store) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in store.db.execute("SELECT device_id, kind FROM events ORDER BY id")]


def _running(store: Store, device: str) -> str:
    return str(store.db.execute("SELECT running_release FROM devices WHERE id = ?", [device]).fetchone()[0])


def test_the_messages_of_one_read_are_checked_then_stored_in_one_transaction_in_arrival_order(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: count the bridge's transactions
    bridge = MqttBridge(store, "mqtt://127.0.0.1:1", TOPICS)
    transactions: list[int] = []
    write = MqttBridge._write
    monkeypatch.setattr(MqttBridge, "_write", lambda self, batch: (transactions.append(len(batch)), write(self, batch)))
    read = [
        Message(TOPICS.events("pi-1"), _event("pi-1", pb.EVENT_KIND_DOWNLOADING), 1),
        Message(TOPICS.status("pi-2"), _status("pi-2", "digits@1.0.0"), 1),
        Message(TOPICS.events("pi-2"), b"not a protobuf", 1),  # refused alone, holds up nothing
        Message(TOPICS.events("pi-2"), _event("pi-2", pb.EVENT_KIND_COMMITTED), 1),
        Message(TOPICS.events("pi-1"), _event("pi-1", pb.EVENT_KIND_VERIFIED), 1),
    ]

    # Execute: one read of five messages
    bridge.receive(read)

    # Assert: the four valid ones in one transaction, in arrival order; nothing left over
    assert transactions == [4]
    assert _events(store) == [("pi-1", "downloading"), ("pi-2", "committed"), ("pi-1", "verified")]
    assert _running(store, "pi-2") == "digits@1.0.0"
    assert store.device("pi-1")["last_event"] == "verified"
    assert bridge.flush_messages() == 0


def _carrying(device: str, kinds: list[int], **first: Any) -> bytes:
    """One events message: the first event carrying the others in `later`, as an agent sends queued events."""
    events = [pb.UpdateEvent(device_id=device, kind=k, release_id="digits@1.0.0", counter=1) for k in kinds]
    events[0].MergeFrom(pb.UpdateEvent(**first))
    events[0].later.extend(events[1:])
    return events[0].SerializeToString()


def test_events_carried_in_one_message_are_stored_in_order_as_one_write(store: Store) -> None:
    # Prepare
    bridge = MqttBridge(store, "mqtt://127.0.0.1:1", TOPICS)

    # Execute: an update's four steps in one message
    bridge.receive([Message(TOPICS.events("pi-1"), _carrying("pi-1", KINDS), 1)])

    # Assert: four events, in the order sent; the device's last event is the last of them
    assert _events(store) == [("pi-1", k) for k in ("downloading", "verified", "installed", "committed")]
    assert store.device("pi-1")["last_event"] == "committed"


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (  # a later event of another device: pi-1 may not speak for pi-2
            pb.UpdateEvent(
                device_id="pi-1", kind=pb.EVENT_KIND_DOWNLOADING, later=[pb.UpdateEvent(device_id="pi-2", kind=3)]
            ),
            "carries one of 'pi-2'",
        ),
        (  # later events nested in later events: one level only
            pb.UpdateEvent(
                device_id="pi-1",
                kind=pb.EVENT_KIND_DOWNLOADING,
                later=[pb.UpdateEvent(device_id="pi-1", kind=3, later=[pb.UpdateEvent(device_id="pi-1", kind=5)])],
            ),
            "later events of their own",
        ),
        (  # a later event of an unknown kind
            pb.UpdateEvent(
                device_id="pi-1", kind=pb.EVENT_KIND_DOWNLOADING, later=[pb.UpdateEvent(device_id="pi-1", kind=99)]
            ),
            "unknown event kind",
        ),
        (  # more events than one report may carry
            pb.UpdateEvent(
                device_id="pi-1",
                kind=pb.EVENT_KIND_DOWNLOADING,
                later=[pb.UpdateEvent(device_id="pi-1", kind=3)] * LIMITS.events_per_report,
            ),
            f"more than {LIMITS.events_per_report} events",
        ),
    ],
)
def test_a_message_with_a_bad_later_event_is_refused_whole(
    store: Store, message: pb.UpdateEvent, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    bridge = MqttBridge(store, "mqtt://127.0.0.1:1", TOPICS)
    payload = message.SerializeToString()
    assert len(payload) <= LIMITS.mqtt_control_payload  # refused for what it says, not for its size

    # Execute
    accepted = bridge.handle(TOPICS.events("pi-1"), payload)

    # Assert: refused with the reason logged; nothing of it stored, not even its valid first event
    assert not accepted
    assert why in caplog.text
    bridge.flush_messages()
    assert _events(store) == []
    assert store.device("pi-1")["last_event"] in (None, "")


def test_a_batch_the_database_cannot_write_now_is_kept_whole_for_the_next_flush(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the database fails in the middle of the batch's transaction, as a full disk does
    record = Store.record_events

    def full_disk(self: Store, events: Any, via: str) -> Any:
        if events[0]["device_id"] == "pi-2":
            raise sqlite3.OperationalError("database or disk is full")
        return record(self, events, via=via)

    monkeypatch.setattr(Store, "record_events", full_disk)
    bridge = MqttBridge(store, "mqtt://127.0.0.1:1", TOPICS)
    bridge.handle(TOPICS.events("pi-1"), _event("pi-1", pb.EVENT_KIND_DOWNLOADING))
    bridge.handle(TOPICS.status("pi-1"), _status("pi-1", "digits@1.0.0"))
    bridge.handle(TOPICS.events("pi-2"), _event("pi-2", pb.EVENT_KIND_DOWNLOADING))
    bridge.handle(TOPICS.events("pi-1"), _event("pi-1", pb.EVENT_KIND_COMMITTED))

    # Execute
    stored = bridge.flush_messages()

    # Assert: nothing of the batch, not even what came before the failing write
    assert stored == 0
    assert _events(store) == [] and _running(store, "pi-1") == ""

    # Execute: the disk has room again; a newer message arrives
    monkeypatch.setattr(Store, "record_events", record)
    bridge.receive([Message(TOPICS.events("pi-2"), _event("pi-2", pb.EVENT_KIND_VERIFIED), 1)])

    # Assert: after a failure only the tick's flush retries (a failing store is not retried once per message)
    assert _events(store) == []

    # Execute: the tick's flush
    stored = bridge.flush_messages()

    # Assert: the failed batch first, whole and once, then the newer message
    assert stored == 5
    assert _events(store) == [
        ("pi-1", "downloading"),
        ("pi-2", "downloading"),
        ("pi-1", "committed"),
        ("pi-2", "verified"),
    ]
    assert _running(store, "pi-1") == "digits@1.0.0"

    # Assert: once a flush succeeded, messages are stored as they come again
    bridge.receive([Message(TOPICS.events("pi-2"), _event("pi-2", pb.EVENT_KIND_INSTALLED), 1)])
    assert _events(store)[-1] == ("pi-2", "installed")


def test_a_message_the_store_refuses_is_dropped_alone_and_holds_up_nothing(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: SQLite refuses pi-2's events (a real constraint failure in the middle of the batch)
    store.db.execute(
        "CREATE TRIGGER refuse_pi2 BEFORE INSERT ON events WHEN NEW.device_id = 'pi-2'"
        " BEGIN SELECT RAISE(ABORT, 'not this one'); END"
    )
    bridge = MqttBridge(store, "mqtt://127.0.0.1:1", TOPICS)
    bridge.handle(TOPICS.events("pi-1"), _event("pi-1", pb.EVENT_KIND_DOWNLOADING))
    bridge.handle(TOPICS.events("pi-2"), _event("pi-2", pb.EVENT_KIND_DOWNLOADING))
    bridge.handle(TOPICS.status("pi-1"), _status("pi-1", "digits@1.0.0"))

    # Execute
    stored = bridge.flush_messages()

    # Assert: the others stored in order, the refused one dropped and said; the next message goes straight in
    assert stored == 2
    assert _events(store) == [("pi-1", "downloading")] and _running(store, "pi-1") == "digits@1.0.0"
    assert "a device message the store refuses was dropped" in caplog.text
    bridge.receive([Message(TOPICS.events("pi-1"), _event("pi-1", pb.EVENT_KIND_COMMITTED), 1)])
    assert _events(store)[-1] == ("pi-1", "committed") and bridge.flush_messages() == 0


def test_telemetry_whose_transaction_fails_is_not_acknowledged(store: Store) -> None:
    # Prepare: two windows of pi-1; SQLite refuses the second, so their one transaction fails
    store.db.execute(
        "CREATE TRIGGER refuse_window BEFORE INSERT ON telemetry WHEN NEW.sequence = 2"
        " BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
    )
    bridge = MqttBridge(store, "mqtt://127.0.0.1:1", TOPICS)
    windows = [window_to_proto(window(digits_reference(), 20, s), "pi-1", s, s) for s in (1, 2)]
    for w in windows:
        assert bridge.handle(TOPICS.telemetry("pi-1"), w.SerializeToString())

    # Execute
    with pytest.raises(sqlite3.IntegrityError):
        bridge.flush_telemetry()

    # Assert: nothing stored, nothing to acknowledge; the device's resend is stored and acknowledged
    assert store.db.execute("SELECT count(*) FROM telemetry").fetchone()[0] == 0
    assert bridge._pending_acks == {}
    store.db.execute("DROP TRIGGER refuse_window")
    for w in windows:
        bridge.handle(TOPICS.telemetry("pi-1"), w.SerializeToString())
    assert bridge.flush_telemetry() == 2
    assert bridge._pending_acks == {"pi-1": 2}


@pytest.mark.broker
def test_a_burst_through_a_real_broker_is_stored_whole_in_order_without_a_tick(
    store: Store, mosquitto: Mosquitto
) -> None:
    """A burst arrives over many reads and is stored read by read: no message waits for the coordinator's tick
    (which this test never runs)."""
    devices = [f"burst-{i}" for i in range(30)]
    for device in devices:
        store.register_device(device, "lab", {}, {}, "test")

    async def scenario() -> list[tuple[str, str]]:
        bridge = MqttBridge(store, mosquitto.url, Topics(f"batching/{id(store)}"))
        topics = bridge.topics
        running = asyncio.create_task(bridge.run())
        try:
            await asyncio.wait_for(bridge.connected.wait(), 30)
            async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="burst-sender") as sender:
                sends: list[Any] = []
                for kind in KINDS:
                    for device in devices:
                        sends.append(sender.publish(topics.events(device), _event(device, kind), qos=1))
                await asyncio.gather(*sends)  # published in this order: one QoS 1 connection keeps it
            async with asyncio.timeout(60):
                while store.count_events() < len(devices) * len(KINDS):
                    await asyncio.sleep(0.05)
            return _events(store)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)

    stored = asyncio.run(scenario())

    kinds = ["downloading", "verified", "installed", "committed"]
    assert len(stored) == len(devices) * len(KINDS)
    for device in devices:
        assert [k for d, k in stored if d == device] == kinds
