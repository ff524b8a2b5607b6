"""The coordinator's MQTT side: publishes desired state and freshness statements, ingests status and update events.

Status and update events are stored in batches. The bridge speaks MQTT through the coordinator's own client
(`server.ingest.mqtt_client`), which hands it the messages of one socket read as one list; each message is checked
and its write queued, and the queue is written in one transaction once the list is checked (or it reaches
`_MAX_BATCH`, or the coordinator's tick flushes it). A fleet-wide update brings several messages per device at
once, and one transaction per message was most of the coordinator's CPU per update on the mirror path.

Invariants:
- A device message's PUBACK goes out after its batch's transaction: the client sends the PUBACKs of a read once
  `receive` returned. A message the broker has seen acknowledged is stored, or (the store refusing writes) held in
  memory for the tick's retry; a coordinator killed before its transaction never acknowledged the message.
  The session is a clean one, so the broker does not send such a message again; what a device publishes while no
  coordinator is connected is lost, as before (its status is retained, so the latest one is read on connect).
- A batch is one transaction: it is stored whole or not at all, in arrival order. A batch the database cannot
  write now (sqlite3.OperationalError: locked, disk full, I/O) is kept, ahead of newer messages, and tried again
  by the coordinator's next tick (not by every message meanwhile: a store that refuses writes is retried five
  times a second, not once per message). A batch that fails otherwise (a message the store refuses, whatever it
  raises) is written again one message per transaction, and only the messages refused on their own are dropped,
  each logged: one bad message never holds up the others.
- Telemetry is confirmed to devices only by the ack topic, published after its windows' transaction committed
  (`flush_telemetry`, then `publish_acks`); a window not stored is never acknowledged, and its device resends it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import ssl
from collections.abc import Callable
from pathlib import Path

from edge_agent.contract import Topics, addresses
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.mqtt_session import keep_session
from server.crashpoints import crash_point
from server.errors import CoordinatorError
from server.ingest.events import EventRejected, parse_events, parse_status
from server.ingest.mqtt_client import MqttClient, MqttClientError
from server.ingest.mqtt_codec import Message
from server.ingest.telemetry import ingest_windows, parse_window
from server.store import Store
from server.store.freshness import FreshnessRecords

__all__ = ["MqttBridge", "parse_mqtt_url"]

logger = logging.getLogger(__name__)

_MAX_BATCH = 1000  # device messages per transaction, at most
_MAX_PENDING = 100_000  # checked messages kept while the store refuses writes; past it the oldest are dropped


def parse_mqtt_url(url: str) -> tuple[str, int, bool]:
    """(host, port, tls) of mqtt://host:port or mqtts://host:port."""
    try:
        return addresses.parse_mqtt_url(url)
    except ValueError as e:
        raise CoordinatorError(str(e)) from e


class MqttBridge:
    def __init__(
        self,
        store: Store,
        url: str,
        topics: Topics,
        client_id: str = "fedfleet-coordinator",
        tls_files: tuple[Path, Path, Path] | None = None,
    ) -> None:
        """`tls_files`: (CA, certificate, key) for an mqtts:// URL; the certificate names the coordinator."""
        self.store = store
        self.host, self.port, tls = parse_mqtt_url(url)
        if tls and tls_files is None:
            raise CoordinatorError("an mqtts:// broker needs the coordinator's client certificate")
        self._ssl_context: ssl.SSLContext | None = None
        if tls and tls_files:
            self._ssl_context = ssl.create_default_context(cafile=str(tls_files[0]))
            self._ssl_context.load_cert_chain(str(tls_files[1]), str(tls_files[2]))
        self.topics = topics
        self.client_id = client_id
        self.connected = asyncio.Event()
        self._pending_acks: dict[str, int] = {}
        self._telemetry: list[tuple[pb.TelemetryWindow, str | None]] = []
        self._writes: list[Callable[[Store], object]] = []  # checked status and events, in arrival order
        self._store_failing = False  # the last flush failed: only the tick's flush retries
        self._client: MqttClient | None = None

    async def run(self) -> None:
        """Keep a session with the broker, ingesting what devices say; reconnect on loss."""
        try:
            await keep_session(self._session, self.connected, 0.5, 10.0, "coordinator", lost=(MqttClientError,))
        finally:
            self.flush_messages()  # what was received is stored before the bridge stops

    async def _session(self, up: Callable[[], None]) -> None:
        client = await MqttClient.connect(
            self.host,
            self.port,
            client_id=self.client_id,
            on_messages=self.receive,
            keepalive=30,
            ssl_context=self._ssl_context,
        )
        try:
            topics = self.topics
            await client.subscribe([(topics.status("+"), 1), (topics.events("+"), 1), (topics.telemetry("+"), 1)])
            self._client = client
            logger.info("connected to MQTT broker %s:%d", self.host, self.port)
            up()
            raise await client.closed
        finally:
            self._client = None
            client.close()

    def receive(self, messages: list[Message]) -> None:
        """Check the messages that arrived together and store what passes in one transaction (their PUBACKs go out
        when this returns; see the module's docstring)."""
        for message in messages:
            self.handle(message.topic, message.payload)
        if not self._store_failing:
            self.flush_messages()

    def handle(self, topic: str, payload: bytes) -> bool:
        """Check one device message and queue its write (status, event; telemetry for `flush_telemetry`); log and
        drop it if it is invalid. Returns whether it was accepted. `receive` stores the queued writes."""
        try:
            if (device := self.topics.device_of(topic, "status")) is not None:
                status = parse_status(payload, device, self.store)
                if status["online"]:
                    self._writes.append(lambda store: store.set_status(**status))
                else:  # a last will, written when the agent started: only its "offline" is current
                    self._writes.append(lambda store: store.set_offline(status["device_id"]))
            elif (device := self.topics.device_of(topic, "events")) is not None:
                events = parse_events(payload, device, self.store)
                self._writes.append(lambda store: store.record_events(events, via="mqtt"))
            elif (device := self.topics.device_of(topic, "telemetry")) is not None:
                self._telemetry.append((parse_window(payload), device))  # stored by flush_telemetry
            else:
                raise EventRejected("not a device status or events topic")
        except EventRejected as e:
            logger.warning("rejected message on %s: %s", topic[:200], e)
            return False
        if not self._store_failing and len(self._writes) >= _MAX_BATCH:
            self.flush_messages()
        return True

    def flush_messages(self) -> int:
        """Store the queued status and event writes in one transaction; returns how many were stored. If the
        database cannot write now, nothing of it is stored and the writes stay queued, first, for the next flush
        (the coordinator's tick calls this); if a write is refused, each is written on its own (module docstring)."""
        batch, self._writes = self._writes, []
        if not batch:
            return 0
        try:
            self._write(batch)
        except sqlite3.OperationalError as e:
            self._writes = batch + self._writes
            dropped = len(self._writes) - _MAX_PENDING
            if dropped > 0:
                del self._writes[:dropped]
                logger.error("the store refuses writes; dropped the %d oldest device messages", dropped)
            logger.warning("%d device message(s) not stored yet (retrying on the next tick): %s", len(batch), e)
            self._store_failing = True
            return 0
        except Exception:
            self._store_failing = False
            return self._one_by_one(batch)
        self._store_failing = False
        return len(batch)

    def _write(self, batch: list[Callable[[Store], object]]) -> None:
        with self.store.transaction():
            for write in batch:
                write(self.store)

    def _one_by_one(self, batch: list[Callable[[Store], object]]) -> int:
        """Write each message in a transaction of its own; drop (and log) the ones refused on their own."""
        stored = 0
        for write in batch:
            try:
                self._write([write])
            except Exception:
                logger.exception("a device message the store refuses was dropped")
            else:
                stored += 1
        return stored

    def flush_telemetry(self) -> int:
        """Store the windows received since the last call in one transaction; note each device's watermark."""
        batch, self._telemetry = self._telemetry, []
        for (window, topic_device), result in zip(batch, ingest_windows(self.store, batch, "mqtt"), strict=True):
            if isinstance(result, EventRejected):
                logger.warning("rejected telemetry window from %s: %s", topic_device, result)
                continue
            self._pending_acks[window.device_id] = result.watermark
        return len(batch)

    async def publish_acks(self) -> int:
        """Publish each device's latest stored watermark (retained), so it can drop what is confirmed."""
        if not self._pending_acks or not self.connected.is_set():
            return 0
        acks, self._pending_acks = self._pending_acks, {}
        messages = [(self.topics.ack(d), pb.TelemetryAck(watermark=w).SerializeToString()) for d, w in acks.items()]
        if not await self._publish_retained(messages):
            self._pending_acks = acks | self._pending_acks  # a newer watermark of the same device wins
            return 0
        return len(acks)

    async def publish_assignments(self) -> int:
        """Publish every unpublished assignment as the device's retained desired state (QoS 1)."""
        if not self.connected.is_set():
            return 0
        rows = self.store.unpublished_assignments()
        if not rows or not await self._publish_retained(
            [(self.topics.desired(r["device_id"]), r["signed"]) for r in rows]
        ):
            return 0
        crash_point("publish:sent")
        self.store.mark_published([(r["device_id"], r["counter"]) for r in rows])
        return len(rows)

    async def publish_freshness(self) -> int:
        """Push every new freshness statement as the device's retained freshness state (QoS 1)."""
        if not self.connected.is_set():
            return 0
        records = FreshnessRecords(self.store)
        rows = records.unpublished()
        if not rows or not await self._publish_retained(
            [(self.topics.freshness(r["device_id"]), r["signed"]) for r in rows]
        ):
            return 0
        records.mark_published([(r["device_id"], r["issued_at"]) for r in rows])
        return len(rows)

    async def _publish_retained(self, messages: list[tuple[str, bytes]]) -> bool:
        """Publish each (topic, payload) retained at QoS 1 and wait for every PUBACK. False if there is no session
        or it was lost first: the caller keeps what it published, and the next tick publishes it again (a retained
        message sent twice is the same state)."""
        client = self._client
        if client is None:
            return False
        try:
            await asyncio.gather(*(client.publish(topic, payload, 1, retain=True) for topic, payload in messages))
        except MqttClientError as e:
            logger.warning("%d message(s) not published yet (retrying on the next tick): %s", len(messages), e)
            return False
        return True
