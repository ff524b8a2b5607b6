"""The coordinator's MQTT side: publishes desired state and freshness statements, ingests status and update events.

Status and update events are stored in batches: each message is checked as it arrives and its write queued; the
queue is written in one transaction once no further message is waiting in the client's queue (or it reaches
`_MAX_BATCH`, or the coordinator's tick flushes it). A fleet-wide update brings several messages per device at
once, and one transaction per message was most of the coordinator's CPU per update on the mirror path.

Invariants:
- The broker's PUBACK is not ours to time: paho sends it when it reads the message, before this module sees it.
  A message is never held back longer than the client's queue holds the ones behind it, so batching adds no
  message to those a crash can lose: only messages that were already waiting together are written together.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt

from edge_agent.contract import Topics, addresses
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.mqtt_session import keep_session
from server.crashpoints import crash_point
from server.errors import CoordinatorError
from server.ingest.events import EventRejected, parse_events, parse_status
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
        self.tls_params = (
            aiomqtt.TLSParameters(ca_certs=str(tls_files[0]), certfile=str(tls_files[1]), keyfile=str(tls_files[2]))
            if tls and tls_files
            else None
        )
        self.topics = topics
        self.client_id = client_id
        self.connected = asyncio.Event()
        self._pending_acks: dict[str, int] = {}
        self._telemetry: list[tuple[pb.TelemetryWindow, str | None]] = []
        self._writes: list[Callable[[Store], object]] = []  # checked status and events, in arrival order
        self._store_failing = False  # the last flush failed: only the tick's flush retries
        self._client: aiomqtt.Client | None = None

    async def run(self) -> None:
        """Keep a session with the broker, ingesting what devices say; reconnect on loss."""

        async def on_connected(client: aiomqtt.Client) -> None:
            # Publishing to a whole fleet at once is normal here; aiomqtt warns past 10 by default.
            client.pending_calls_threshold = 100_000
            self._client = client
            await client.subscribe(f"{self.topics.prefix}/devices/+/status", qos=1)
            await client.subscribe(f"{self.topics.prefix}/devices/+/events", qos=1)
            await client.subscribe(f"{self.topics.prefix}/devices/+/telemetry", qos=1)
            logger.info("connected to MQTT broker %s:%d", self.host, self.port)

        def make_client() -> aiomqtt.Client:
            return aiomqtt.Client(
                self.host,
                self.port,
                identifier=self.client_id,
                keepalive=30,
                max_queued_outgoing_messages=100_000,
                tls_params=self.tls_params,
            )

        try:
            await keep_session(make_client, on_connected, self.handle, self.connected, 0.5, 10.0, "coordinator")
        finally:
            self.flush_messages()  # what was received is stored before the bridge stops

    def handle(self, topic: str, payload: Any) -> bool:
        """Check one device message and queue its write (status, event; telemetry for `flush_telemetry`); log and
        drop it if it is invalid. Returns whether it was accepted. The queued writes are stored once no other
        message waits behind this one (see the module's docstring)."""
        if not isinstance(payload, bytes | bytearray):
            payload = b""
        try:
            if (device := self.topics.device_of(topic, "status")) is not None:
                status = parse_status(bytes(payload), device, self.store)
                if status["online"]:
                    self._writes.append(lambda store: store.set_status(**status))
                else:  # a last will, written when the agent started: only its "offline" is current
                    self._writes.append(lambda store: store.set_offline(status["device_id"]))
            elif (device := self.topics.device_of(topic, "events")) is not None:
                events = parse_events(bytes(payload), device, self.store)
                self._writes.append(lambda store: store.record_events(events, via="mqtt"))
            elif (device := self.topics.device_of(topic, "telemetry")) is not None:
                self._telemetry.append((parse_window(bytes(payload)), device))  # stored by flush_telemetry
            else:
                raise EventRejected("not a device status or events topic")
        except EventRejected as e:
            logger.warning("rejected message on %s: %s", topic[:200], e)
            return False
        others_waiting = self._client is not None and len(self._client.messages) > 0
        if not self._store_failing and (not others_waiting or len(self._writes) >= _MAX_BATCH):
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
        client = self._client
        if client is None or not self.connected.is_set() or not self._pending_acks:
            return 0
        acks, self._pending_acks = self._pending_acks, {}
        await asyncio.gather(
            *(
                client.publish(self.topics.ack(d), pb.TelemetryAck(watermark=w).SerializeToString(), qos=1, retain=True)
                for d, w in acks.items()
            )
        )
        return len(acks)

    async def publish_assignments(self) -> int:
        """Publish every unpublished assignment as the device's retained desired state (QoS 1)."""
        client = self._client
        if client is None or not self.connected.is_set():
            return 0
        rows = self.store.unpublished_assignments()
        if not rows:
            return 0
        await asyncio.gather(
            *(client.publish(self.topics.desired(r["device_id"]), r["signed"], qos=1, retain=True) for r in rows)
        )
        crash_point("publish:sent")
        self.store.mark_published([(r["device_id"], r["counter"]) for r in rows])
        return len(rows)

    async def publish_freshness(self) -> int:
        """Push every new freshness statement as the device's retained freshness state (QoS 1)."""
        client = self._client
        if client is None or not self.connected.is_set():
            return 0
        records = FreshnessRecords(self.store)
        rows = records.unpublished()
        if not rows:
            return 0
        await asyncio.gather(
            *(client.publish(self.topics.freshness(r["device_id"]), r["signed"], qos=1, retain=True) for r in rows)
        )
        records.mark_published([(r["device_id"], r["issued_at"]) for r in rows])
        return len(rows)
