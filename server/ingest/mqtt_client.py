"""The coordinator's MQTT 3.1.1 client: one connection to the broker as an asyncio protocol, on the codec the
embedded broker uses (`server.ingest.mqtt_codec`).

Why not paho + aiomqtt (the agent keeps them): per device update the coordinator reads about three device messages
and publishes two, and paho's packet handling with aiomqtt's task and futures per message were most of its CPU per
update on the mirror path (docs/scaling.md). This client does what the bridge needs and nothing else: QoS 0 and 1
both ways, retained publishes, keepalive, TLS with a client certificate. No will, no QoS 2, no persistent-session
bookkeeping of its own.

Invariants:
- Messages reach `on_messages` in the order the broker sent them, as one list per read from the socket. The PUBACKs
  of that list's QoS 1 messages go out in one write after `on_messages` returned: the broker hears that a message
  arrived only once the handler has stored it (or kept it for a retry). If the handler raises, the connection is
  closed and nothing of that read is acknowledged.
- A QoS 1 publish's future completes with the broker's PUBACK. At most `max_inflight` publishes wait for theirs;
  later ones queue in order and go out as PUBACKs free packet ids.
- When the connection ends, for any reason (the broker closed it, a protocol error, a keepalive missed, `close`),
  every unfinished future fails with MqttClientError and `closed` gets the reason. The client is not reused: the
  caller connects a new one (`keep_session` in the contract does, with back-off).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from server.ingest.mqtt_codec import (
    DISCONNECT,
    MAX_PACKET_ID,
    PINGREQ,
    SUBACK_FAILURE,
    Acknowledgement,
    ConnAck,
    MalformedPacket,
    Message,
    PacketReader,
    PacketType,
    Publish,
    Signal,
    SubAck,
    decode_server_packet,
    encode_acknowledgement,
    encode_connect,
    encode_publish_header,
    encode_subscribe,
)

__all__ = ["MqttClient", "MqttClientError"]

logger = logging.getLogger(__name__)

_CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorised",
}


class MqttClientError(Exception):
    """The connection could not be made, was refused, or ended."""


class MqttClient(asyncio.Protocol):
    """Make one with `await MqttClient.connect(...)`."""

    def __init__(
        self,
        on_messages: Callable[[list[Message]], object],
        keepalive: float,
        max_inflight: int,
        max_packet_size: int,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_messages = on_messages
        self._keepalive = keepalive
        self._max_inflight = max_inflight
        self._reader = PacketReader(max_packet_size, decode_server_packet)
        self._transport: asyncio.Transport | None = None
        self._connack: asyncio.Future[ConnAck] = self._loop.create_future()
        self._subacks: dict[int, asyncio.Future[SubAck]] = {}
        self._inflight: dict[int, asyncio.Future[None]] = {}  # packet id -> the publish waiting for its PUBACK
        self._queued: deque[tuple[str, bytes, bool, asyncio.Future[None]]] = deque()  # over max_inflight, in order
        self._next_id = 0
        self._last_received = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self.closed: asyncio.Future[MqttClientError] = self._loop.create_future()
        """Completes, with the reason, when the connection has ended."""

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        client_id: str,
        on_messages: Callable[[list[Message]], object],
        keepalive: int = 30,
        clean_session: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
        max_inflight: int = 1000,
        max_packet_size: int = 16 * 1024 * 1024,
    ) -> MqttClient:
        """Connect and wait for the broker's CONNACK (within `timeout` seconds). Raises MqttClientError."""
        if not 1 <= max_inflight < MAX_PACKET_ID:
            raise ValueError(f"max_inflight must be 1 to {MAX_PACKET_ID - 1}, not {max_inflight}")
        loop = asyncio.get_running_loop()
        where = f"{host}:{port}"
        client: MqttClient | None = None
        try:
            async with asyncio.timeout(timeout):
                _, protocol = await loop.create_connection(
                    lambda: cls(on_messages, keepalive, max_inflight, max_packet_size),
                    host,
                    port,
                    ssl=ssl_context,
                    server_hostname=host if ssl_context else None,
                )
                client = protocol
                client._send(encode_connect(client_id, keepalive, clean_session))
                connack = await asyncio.shield(client._connack)
        except TimeoutError:
            if client is not None:
                client._abort(MqttClientError("no CONNACK in time"))
            raise MqttClientError(f"MQTT broker {where}: no connection within {timeout:g} s") from None
        except (OSError, MqttClientError) as e:
            raise MqttClientError(f"MQTT broker {where}: {e}") from e
        except BaseException:
            if client is not None:
                client._abort(MqttClientError("connect cancelled"))
            raise
        if connack.return_code != 0:
            reason = _CONNACK_REASONS.get(connack.return_code, "unknown return code")
            client.close()
            raise MqttClientError(f"MQTT broker {where} refused the connection: {reason} ({connack.return_code})")
        client._timer = loop.call_later(keepalive / 2, client._keep_alive)
        return client

    # --- what the caller uses -------------------------------------------------------------------------------------

    async def subscribe(self, requests: list[tuple[str, int]]) -> None:
        """Subscribe to (filter, QoS 0 or 1) pairs; raises MqttClientError if the broker refuses any."""
        if any(qos not in (0, 1) for _, qos in requests):
            raise ValueError("this client subscribes at QoS 0 or 1 only")
        self._check_open()
        packet_id = self._new_packet_id()
        suback = self._subacks[packet_id] = self._loop.create_future()
        self._send(encode_subscribe(packet_id, requests))
        granted = (await suback).return_codes
        refused = [f for (f, _), code in zip(requests, granted, strict=False) if code == SUBACK_FAILURE]
        if refused or len(granted) != len(requests):
            raise MqttClientError(f"the broker refused the subscription to {refused or requests}")

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> asyncio.Future[None]:
        """Send a message; the future completes when it is sent (QoS 0) or the broker acknowledged it (QoS 1), and
        fails with MqttClientError if the connection ends first."""
        if qos not in (0, 1):
            raise ValueError("this client publishes at QoS 0 or 1 only")
        done: asyncio.Future[None] = self._loop.create_future()
        if self.closed.done():
            done.set_exception(MqttClientError(str(self.closed.result())))
            done.exception()  # the caller may drop it: nothing to log
        elif qos == 0:
            self._write(encode_publish_header(topic, len(payload), 0, retain), payload)
            done.set_result(None)
        elif len(self._inflight) >= self._max_inflight:
            self._queued.append((topic, payload, retain, done))
        else:
            self._transmit(topic, payload, retain, done)
        return done

    def close(self) -> None:
        """Disconnect cleanly (DISCONNECT, then close); `closed` completes once the socket is closed."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(DISCONNECT)
            self._transport.close()

    # --- the protocol ---------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._last_received = self._loop.time()
        self._reader.feed(data)
        messages: list[Message] = []
        acks: list[int] = []
        try:
            while (packet := self._reader.next_packet()) is not None:
                if isinstance(packet, Publish):
                    if packet.message.qos == 2:
                        raise MalformedPacket("a QoS 2 message on a subscription of QoS 1 at most")
                    messages.append(packet.message)
                    if packet.packet_id:
                        acks.append(packet.packet_id)
                else:
                    self._on_control(packet)
        except MalformedPacket as e:
            self._abort(MqttClientError(f"the broker broke the protocol: {e}"))
            acks = []  # what was read before is handed on, never acknowledged on a connection being closed
        if messages:
            try:
                self._on_messages(messages)
            except Exception:
                logger.exception("the MQTT message handler failed; closing the connection, nothing acknowledged")
                self._abort(MqttClientError("the message handler failed"))
                return
        if acks and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(encode_acknowledgement(PacketType.PUBACK, i) for i in acks))

    def connection_lost(self, exc: Exception | None) -> None:
        reason = MqttClientError(f"connection lost: {exc}" if exc else "the broker closed the connection")
        if not self.closed.done():
            self.closed.set_result(reason)
        if self._timer is not None:
            self._timer.cancel()
        waiting: list[asyncio.Future[Any]] = [self._connack, *self._subacks.values(), *self._inflight.values()]
        waiting += [queued[3] for queued in self._queued]
        self._subacks.clear()
        self._inflight.clear()
        self._queued.clear()
        for future in waiting:
            if not future.done():
                future.set_exception(self.closed.result())
                future.exception()  # a publish nobody awaits any more must not log "never retrieved"

    # --- inside ---------------------------------------------------------------------------------------------------

    def _on_control(self, packet: Acknowledgement | ConnAck | SubAck | Signal) -> None:
        if isinstance(packet, Acknowledgement) and packet.kind == PacketType.PUBACK:
            published = self._inflight.pop(packet.packet_id, None)
            if published is None:
                raise MalformedPacket(f"PUBACK for packet id {packet.packet_id}, which is not in flight")
            if not published.done():
                published.set_result(None)
            while self._queued and len(self._inflight) < self._max_inflight:
                self._transmit(*self._queued.popleft())
        elif isinstance(packet, SubAck):
            suback = self._subacks.pop(packet.packet_id, None)
            if suback is None:
                raise MalformedPacket(f"SUBACK for packet id {packet.packet_id}, which was not asked for")
            if not suback.done():
                suback.set_result(packet)
        elif isinstance(packet, ConnAck):
            if self._connack.done():
                raise MalformedPacket("a second CONNACK")
            self._connack.set_result(packet)
        elif packet.kind != PacketType.PINGRESP:
            raise MalformedPacket(f"{packet.kind.name}, which this client never asks for")

    def _transmit(self, topic: str, payload: bytes, retain: bool, done: asyncio.Future[None]) -> None:
        packet_id = self._new_packet_id()
        self._inflight[packet_id] = done
        self._write(encode_publish_header(topic, len(payload), 1, retain, packet_id), payload)

    def _new_packet_id(self) -> int:
        """The next packet id not in use (at most max_inflight publishes and a few subscriptions are)."""
        while True:
            self._next_id = self._next_id % MAX_PACKET_ID + 1
            if self._next_id not in self._inflight and self._next_id not in self._subacks:
                return self._next_id

    def _write(self, header: bytes, payload: bytes) -> None:
        assert self._transport is not None
        self._transport.writelines((header, payload))

    def _send(self, packet: bytes) -> None:
        assert self._transport is not None
        self._transport.write(packet)

    def _check_open(self) -> None:
        if self.closed.done():
            raise MqttClientError(str(self.closed.result()))

    def _keep_alive(self) -> None:
        """Every half keepalive: a PINGREQ, and the connection closed if the broker has said nothing (not even a
        PINGRESP) for one and a half keepalives (MQTT's own rule for the broker's side, §3.1.2.10)."""
        if self._loop.time() - self._last_received > 1.5 * self._keepalive:
            self._abort(MqttClientError(f"the broker sent nothing for {1.5 * self._keepalive:g} s"))
            return
        self._send(PINGREQ)
        self._timer = self._loop.call_later(self._keepalive / 2, self._keep_alive)

    def _abort(self, reason: MqttClientError) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)
        if self._transport is not None:
            self._transport.abort()
