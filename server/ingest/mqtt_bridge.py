"""The coordinator's MQTT side: publishes desired state and freshness statements, ingests status and update events."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiomqtt

from edge_agent.contract import Topics, addresses
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.mqtt_session import keep_session
from server.crashpoints import crash_point
from server.errors import CoordinatorError
from server.ingest.events import EventRejected, parse_event, parse_status
from server.ingest.telemetry import ingest_windows, parse_window
from server.store import Store
from server.store.freshness import FreshnessRecords

__all__ = ["MqttBridge", "parse_mqtt_url"]

logger = logging.getLogger(__name__)


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

        await keep_session(make_client, on_connected, self.handle, self.connected, 0.5, 10.0, "coordinator")

    def handle(self, topic: str, payload: Any) -> bool:
        """Store one device message if it is valid; log and drop it otherwise. Returns whether it was stored."""
        if not isinstance(payload, bytes | bytearray):
            payload = b""
        try:
            if (device := self.topics.device_of(topic, "status")) is not None:
                status = parse_status(bytes(payload), device, self.store)
                if status["online"]:
                    self.store.set_status(**status)
                else:  # a last will, written when the agent started: only its "offline" is current
                    self.store.set_offline(device)
            elif (device := self.topics.device_of(topic, "events")) is not None:
                self.store.record_events([parse_event(bytes(payload), device, self.store)], via="mqtt")
            elif (device := self.topics.device_of(topic, "telemetry")) is not None:
                self._telemetry.append((parse_window(bytes(payload)), device))  # stored by flush_telemetry
            else:
                raise EventRejected("not a device status or events topic")
        except EventRejected as e:
            logger.warning("rejected message on %s: %s", topic[:200], e)
            return False
        return True

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
