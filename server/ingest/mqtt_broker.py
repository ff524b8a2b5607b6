"""A small MQTT 3.1.1 broker in asyncio and the standard library: the one `fedfleet serve` runs on loopback when it
is given no broker.

Why our own (docs/adr/0002-broker-choice.md): the coordinator on one machine needs a broker inside its process, and
the Python broker embedded before pinned a typer that Flower cannot share and had to be patched for cross-client
retained delivery. What fedfleet's clients (the agent's aiomqtt over paho-mqtt 2, the coordinator's own client) use
of MQTT 3.1.1 fits in this module and its codec (`server.ingest.mqtt_codec`, the packets): QoS 0, 1 and 2 both
ways, retained messages, wills, keepalive, persistent sessions, client-id takeover. It is for loopback only: no
TLS, no authentication or ACLs (a username and password are accepted and ignored), no MQTT 3.1 or 5, no `$SYS`
topics, no QoS 0 queueing for offline sessions, nothing kept on disk (it lives in the coordinator's process; a
restart starts it empty, without sessions or retained messages).

How it holds together (the invariants the code keeps):
- A connection owns no task. Each packet is handled synchronously in its `data_received` callback, and a PUBLISH
  reaches the outgoing buffer of every subscriber before the next packet is read. So messages to one client leave
  in the order the broker received them, and no state needs a lock.
- A connection's outgoing queue is its transport's write buffer. Once more than `max_outgoing_bytes` wait there the
  client is too slow: it is disconnected with a warning, so one stalled reader neither blocks the others nor grows
  the broker's memory.
- Sessions, not connections, hold subscriptions and unacknowledged messages. A persistent session (clean session 0)
  outlives its connection: QoS 1 and 2 messages for it queue while it is away (at most `max_queued_messages`, the
  oldest dropped first) and those sent but not acknowledged go again, DUP set, when it comes back.
- Subscriptions and retained messages live in trees keyed by topic level: a PUBLISH walks only the branches its
  topic can match, and a device subscribing to its own topic finds its retained message in a few dict lookups.
- A will is published when a connection ends for any reason but DISCONNECT (closed socket, protocol error, missed
  keepalive, takeover, too slow), from `connection_lost`: after the packet being handled has been routed in full.
- Client misbehaviour (a malformed or oversize packet, bad UTF-8, a wildcard in a PUBLISH topic, no CONNECT in time,
  a keepalive missed) closes that connection only, with one log line and no traceback.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from server.ingest.mqtt_codec import (
    MAX_PACKET_ID,
    MAX_REMAINING_LENGTH,
    PINGRESP,
    SUBACK_FAILURE,
    Acknowledgement,
    Connect,
    ConnectRefused,
    ConnectReturnCode,
    MalformedPacket,
    Message,
    Packet,
    PacketReader,
    PacketType,
    Publish,
    Signal,
    Subscribe,
    Unsubscribe,
    decode_packet,
    encode_acknowledgement,
    encode_connack,
    encode_publish_header,
    encode_suback,
    encode_unsuback,
    is_valid_topic_filter,
)

__all__ = ["BrokerLimits", "MqttBroker", "RetainedStore", "SubscriptionTree"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BrokerLimits:
    """What one client may cost the broker; each limit is reached only by a client that misbehaves or stalls."""

    max_packet_size: int = 16 * 1024 * 1024
    """Largest packet accepted, fixed header included. A bigger one closes the connection when its header is in."""
    connect_timeout: float = 10.0
    """Seconds a new connection has to send CONNECT, so that idle sockets cannot pile up."""
    max_queued_messages: int = 10_000
    """QoS 1 and 2 messages one session may hold unsent (offline, or out of packet ids) before the oldest go."""
    max_outgoing_bytes: int = 64 * 1024 * 1024
    """Unsent bytes a connection may accumulate before the client counts as too slow and is disconnected."""

    def __post_init__(self) -> None:
        if not 2 <= self.max_packet_size <= MAX_REMAINING_LENGTH + 5:
            raise ValueError(f"max_packet_size must be 2 to {MAX_REMAINING_LENGTH + 5}, not {self.max_packet_size}")
        if self.connect_timeout <= 0 or self.max_queued_messages < 1 or self.max_outgoing_bytes < 1:
            raise ValueError(f"broker limits must be positive: {self}")


S = TypeVar("S", bound=Hashable)


class _FilterNode(Generic[S]):
    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _FilterNode[S]] = {}
        self.subscribers: dict[S, int] = {}  # subscriber -> granted QoS


class SubscriptionTree(Generic[S]):
    """Topic filters by level, each with its subscribers and their granted QoS.

    Matching a topic follows, level by level, the literal child, `+` and `#` only: its cost grows with the topic's
    depth and the filters that do match, not with every client's every filter (the coordinator fans out to
    thousands of device topics). Walks are loops, not recursion: a hostile filter may have thousands of levels.
    """

    def __init__(self) -> None:
        self._root: _FilterNode[S] = _FilterNode()

    def add(self, topic_filter: str, subscriber: S, qos: int) -> None:
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _FilterNode()
            node = child
        node.subscribers[subscriber] = qos

    def remove(self, topic_filter: str, subscriber: S) -> None:
        levels = topic_filter.split("/")
        path = [self._root]
        for level in levels:
            child = path[-1].children.get(level)
            if child is None:
                return
            path.append(child)
        path[-1].subscribers.pop(subscriber, None)
        for depth in range(len(levels), 0, -1):  # prune the branch back to the last node still in use
            node = path[depth]
            if node.children or node.subscribers:
                break
            del path[depth - 1].children[levels[depth - 1]]

    def match(self, topic: str) -> dict[S, int]:
        """Every subscriber with a filter matching `topic`, once, at the highest QoS any of its filters grants."""
        found: dict[S, int] = {}

        def take(subscribers: dict[S, int]) -> None:
            for subscriber, qos in subscribers.items():
                if found.get(subscriber, -1) < qos:
                    found[subscriber] = qos

        wildcards_at_root = not topic.startswith("$")
        nodes = [self._root]
        for depth, level in enumerate(topic.split("/")):
            wildcards = depth > 0 or wildcards_at_root
            next_nodes = []
            for node in nodes:
                children = node.children
                if wildcards and (rest := children.get("#")) is not None:
                    take(rest.subscribers)
                if (literal := children.get(level)) is not None:
                    next_nodes.append(literal)
                if wildcards and (one := children.get("+")) is not None:
                    next_nodes.append(one)
            nodes = next_nodes
            if not nodes:
                return found
        for node in nodes:
            take(node.subscribers)
            if (parent := node.children.get("#")) is not None:  # `a/#` matches `a` too
                take(parent.subscribers)
        return found


class _TopicNode:
    __slots__ = ("children", "message")

    def __init__(self) -> None:
        self.children: dict[str, _TopicNode] = {}
        self.message: Message | None = None


class RetainedStore:
    """The retained message of each topic, by level, so a new subscription finds its messages by walking its filter
    (a device's own topic is a few dict lookups) instead of testing every retained topic against it."""

    def __init__(self) -> None:
        self._root = _TopicNode()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def keep(self, message: Message) -> None:
        """Keep `message` as its topic's retained message, replacing the one before; an empty payload deletes it
        (§3.3.1.3)."""
        levels = message.topic.split("/")
        if message.payload:
            node = self._root
            for level in levels:
                child = node.children.get(level)
                if child is None:
                    child = node.children[level] = _TopicNode()
                node = child
            self._count += node.message is None
            node.message = message
            return
        path = [self._root]
        for level in levels:
            found = path[-1].children.get(level)
            if found is None:
                return
            path.append(found)
        if path[-1].message is None:
            return
        path[-1].message = None
        self._count -= 1
        for depth in range(len(levels), 0, -1):
            node = path[depth]
            if node.children or node.message is not None:
                break
            del path[depth - 1].children[levels[depth - 1]]

    def matching(self, topic_filter: str) -> list[Message]:
        """The retained messages whose topics a valid `topic_filter` matches."""
        levels = topic_filter.split("/")
        found: list[Message] = []
        stack = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            if depth == len(levels):
                if node.message is not None:
                    found.append(node.message)
                continue
            level = levels[depth]
            if level == "#":
                if node.message is not None:  # the parent level (`a/#` matches `a`); the root holds none
                    found.append(node.message)
                subtree = [c for name, c in node.children.items() if depth or not name.startswith("$")]
                while subtree:
                    below = subtree.pop()
                    if below.message is not None:
                        found.append(below.message)
                    subtree.extend(below.children.values())
            elif level == "+":
                stack.extend((c, depth + 1) for name, c in node.children.items() if depth or not name.startswith("$"))
            elif (child := node.children.get(level)) is not None:
                stack.append((child, depth + 1))
        return found


# --- sessions -----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Outbound:
    """A QoS 1 or 2 message on its way to one session: queued, or sent and awaiting PUBACK, PUBREC or PUBCOMP."""

    message: Message
    qos: int
    retain: bool
    released: bool = False  # QoS 2: PUBREC came and PUBREL went; PUBCOMP awaited


class Session:
    """What the broker keeps for one client id: its subscriptions, the QoS 1 and 2 messages sent to it and not yet
    acknowledged (in the order sent, for a resend in that order), those not yet sent, and the ids of QoS 2
    messages it sent that were routed but not yet released. `connection` is None while the client is away; only a
    persistent session is kept then."""

    def __init__(self, client_id: str, persistent: bool, limits: BrokerLimits) -> None:
        self.client_id = client_id
        self.persistent = persistent
        self.connection: _Connection | None = None
        self.subscriptions: dict[str, int] = {}
        self.unreleased: set[int] = set()
        self._limits = limits
        self._inflight: dict[int, _Outbound] = {}
        self._queued: deque[_Outbound] = deque()
        self._last_packet_id = 0
        self._dropped = 0

    def deliver(self, message: Message, qos: int, retain: bool) -> None:
        """Send `message` at `qos` (already the lower of its own and the subscription's), or queue it if the client
        is away or out of packet ids; QoS 0 goes only to a connected client."""
        connection = self.connection
        if qos == 0:
            if connection is not None:
                connection.send_publish(message, 0, retain)
            return
        outbound = _Outbound(message, qos, retain)
        if connection is not None and not self._queued and len(self._inflight) < MAX_PACKET_ID:
            self._transmit(connection, outbound)
            return
        self._queued.append(outbound)
        if len(self._queued) > self._limits.max_queued_messages:
            if connection is not None:  # 65535 messages unacknowledged and more waiting: it has stopped acking
                connection.close(f"too slow: {len(self._queued)} messages wait for a packet id", logging.WARNING)
            self._queued.popleft()
            if not self._dropped:
                logger.warning(
                    "MQTT session %s has %d messages queued, its limit: dropping the oldest",
                    self.client_id,
                    self._limits.max_queued_messages,
                )
            self._dropped += 1

    def resume(self) -> None:
        """On a new connection: resend what the client has not acknowledged (same packet ids, DUP set, §4.4), then
        send what queued while it was away."""
        if self._dropped:
            logger.warning("MQTT client %s lost %d queued messages to its queue limit", self.client_id, self._dropped)
            self._dropped = 0
        connection = self.connection
        for packet_id, outbound in list(self._inflight.items()):
            if connection is None:
                return
            if outbound.released:
                connection.send(encode_acknowledgement(PacketType.PUBREL, packet_id))
            else:
                connection.send_publish(outbound.message, outbound.qos, outbound.retain, packet_id, dup=True)
            connection = self.connection
        self._send_queued()

    def on_puback(self, packet_id: int) -> None:
        outbound = self._inflight.get(packet_id)
        if outbound is not None and outbound.qos == 1:
            del self._inflight[packet_id]
            self._send_queued()

    def on_pubrec(self, packet_id: int) -> None:
        outbound = self._inflight.get(packet_id)
        if outbound is not None and outbound.qos == 2 and self.connection is not None:
            outbound.released = True
            self.connection.send(encode_acknowledgement(PacketType.PUBREL, packet_id))

    def on_pubcomp(self, packet_id: int) -> None:
        outbound = self._inflight.get(packet_id)
        if outbound is not None and outbound.released:
            del self._inflight[packet_id]
            self._send_queued()

    def _send_queued(self) -> None:
        while self._queued and self.connection is not None and len(self._inflight) < MAX_PACKET_ID:
            self._transmit(self.connection, self._queued.popleft())

    def _transmit(self, connection: _Connection, outbound: _Outbound) -> None:
        packet_id = self._last_packet_id
        while True:  # the caller made sure one is free
            packet_id = packet_id % MAX_PACKET_ID + 1
            if packet_id not in self._inflight:
                break
        self._last_packet_id = packet_id
        self._inflight[packet_id] = outbound  # before sending: a client that is too slow gets it again on resume
        connection.send_publish(outbound.message, outbound.qos, outbound.retain, packet_id)


# --- connections --------------------------------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One client's socket: cuts its bytes into packets, plays the client's side of the protocol against the broker,
    and writes what the broker sends it. It owns no task; its timers are the CONNECT deadline, then the keepalive."""

    def __init__(self, broker: MqttBroker) -> None:
        self._broker = broker
        self._limits = broker.limits
        self._loop = asyncio.get_running_loop()
        self._reader = PacketReader(self._limits.max_packet_size, decode_packet)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._keepalive = 0
        self._last_heard = 0.0
        self._closing = False
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.peer = "?"
        self.client_id = ""
        self.session: Session | None = None
        self.will: Message | None = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._last_heard = self._loop.time()
        if not self._broker.add_connection(self):
            self._closing = True
            self._transport.abort()
            return
        self._timer = self._loop.call_later(self._limits.connect_timeout, self._connect_overdue)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_heard = self._loop.time()
        self._reader.feed(data)
        try:
            while not self._closing and (packet := self._reader.next_packet()) is not None:
                self._handle(packet)
        except MalformedPacket as e:
            self.close(f"protocol error: {e}", logging.WARNING)
        except ConnectRefused as e:
            if self.session is not None:  # a second CONNECT, of another protocol level at that
                self.close("protocol error: a second CONNECT", logging.WARNING)
                return
            assert self._transport is not None
            self._transport.write(encode_connack(False, e.return_code))
            self.close(f"CONNECT refused: {e}", logging.WARNING, flush=True)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self._closing:
            self._closing = True
            logger.debug("MQTT client %s (%s): connection lost (%s)", self.client_id, self.peer, exc or "closed")
            self._broker.detach(self)
        will, self.will = self.will, None
        self._broker.remove_connection(self)
        if will is not None:
            self._broker.publish(will)
        self.closed.set_result(None)

    # writing

    def send(self, packet: bytes, payload: bytes = b"") -> None:
        """Queue bytes for the client, unless it is closing; a client with too much unsent is disconnected."""
        if self._closing:
            return
        assert self._transport is not None
        waiting = self._transport.get_write_buffer_size()
        if waiting > self._limits.max_outgoing_bytes:
            self.close(f"too slow: {waiting} bytes wait to be sent to it", logging.WARNING)
        elif payload:
            self._transport.writelines((packet, payload))
        else:
            self._transport.write(packet)

    def send_publish(self, message: Message, qos: int, retain: bool, packet_id: int = 0, dup: bool = False) -> None:
        header = encode_publish_header(message.topic, len(message.payload), qos, retain, packet_id, dup)
        self.send(header, message.payload)

    def close(self, reason: str, level: int = logging.DEBUG, flush: bool = False) -> None:
        """End the connection: the session is let go at once (it takes no more messages); the will, if any, is
        published from `connection_lost`. `flush` sends what is queued first (a CONNACK refusal)."""
        if self._closing:
            return
        self._closing = True
        logger.log(level, "MQTT client %s (%s): %s; closing the connection", self.client_id or "-", self.peer, reason)
        self._broker.detach(self)
        assert self._transport is not None
        if flush:
            self._transport.close()
        else:
            self._transport.abort()

    def shut_down(self) -> None:
        """Close for a broker that stops: no will, nothing flushed."""
        self.will = None
        self.close("the broker stops")
        if self._transport is not None:
            self._transport.abort()  # also a transport still flushing after DISCONNECT

    # timers

    def _connect_overdue(self) -> None:
        self.close(f"no CONNECT within {self._limits.connect_timeout:g} s", logging.WARNING)

    def _check_keepalive(self) -> None:
        limit = self._keepalive * 1.5  # §3.1.2.10
        silent = self._loop.time() - self._last_heard
        if silent >= limit:
            self.close(f"silent for {silent:.1f} s, over 1.5 x its keepalive of {self._keepalive} s", logging.WARNING)
        else:
            self._timer = self._loop.call_later(limit - silent, self._check_keepalive)

    # the protocol

    def _handle(self, packet: Packet) -> None:
        session = self.session
        if session is None:
            if not isinstance(packet, Connect):
                raise MalformedPacket(f"{type(packet).__name__} before CONNECT")
            self._on_connect(packet)
        elif isinstance(packet, Publish):
            self._on_publish(session, packet)
        elif isinstance(packet, Acknowledgement):
            if packet.kind == PacketType.PUBACK:
                session.on_puback(packet.packet_id)
            elif packet.kind == PacketType.PUBREC:
                session.on_pubrec(packet.packet_id)
            elif packet.kind == PacketType.PUBCOMP:
                session.on_pubcomp(packet.packet_id)
            else:  # PUBREL: the client releases a QoS 2 message it sent (routed when it came)
                session.unreleased.discard(packet.packet_id)
                self.send(encode_acknowledgement(PacketType.PUBCOMP, packet.packet_id))
        elif isinstance(packet, Subscribe):
            self._on_subscribe(session, packet)
        elif isinstance(packet, Unsubscribe):
            for topic_filter in packet.filters:
                self._broker.unsubscribe(session, topic_filter)
            self.send(encode_unsuback(packet.packet_id))
        elif isinstance(packet, Signal) and packet.kind == PacketType.PINGREQ:
            self.send(PINGRESP)
        elif isinstance(packet, Signal):  # DISCONNECT: the will is discarded (§3.14.4)
            self.will = None
            self.close("disconnected", flush=True)
        else:
            raise MalformedPacket("a second CONNECT")

    def _on_connect(self, packet: Connect) -> None:
        client_id = packet.client_id
        if not client_id:
            if not packet.clean_session:
                raise ConnectRefused(ConnectReturnCode.IDENTIFIER_REJECTED, "an empty client id needs clean session")
            client_id = f"auto-{secrets.token_hex(8)}"
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.client_id = client_id
        self.session, present = self._broker.attach(self, client_id, packet.clean_session)
        self.will = packet.will
        self._keepalive = packet.keepalive
        if self._keepalive:
            self._timer = self._loop.call_later(self._keepalive * 1.5, self._check_keepalive)
        logger.debug(
            "MQTT client %s (%s) connected: clean session %s, keepalive %d s, session present %s",
            client_id,
            self.peer,
            packet.clean_session,
            packet.keepalive,
            present,
        )
        self.send(encode_connack(present, ConnectReturnCode.ACCEPTED))
        self.session.resume()

    def _on_publish(self, session: Session, packet: Publish) -> None:
        message = packet.message
        if message.qos == 2:  # exactly once: a resent id is acknowledged again but not routed again
            if packet.packet_id not in session.unreleased:
                session.unreleased.add(packet.packet_id)
                self._broker.publish(message)
            self.send(encode_acknowledgement(PacketType.PUBREC, packet.packet_id))
            return
        self._broker.publish(message)
        if message.qos == 1:
            self.send(encode_acknowledgement(PacketType.PUBACK, packet.packet_id))

    def _on_subscribe(self, session: Session, packet: Subscribe) -> None:
        return_codes, granted = [], []
        for topic_filter, qos in packet.requests:
            if is_valid_topic_filter(topic_filter):
                self._broker.subscribe(session, topic_filter, qos)
                return_codes.append(qos)
                granted.append((topic_filter, qos))
            else:
                return_codes.append(SUBACK_FAILURE)
        self.send(encode_suback(packet.packet_id, return_codes))
        for message, qos in self._broker.retained_for(granted):
            session.deliver(message, qos, retain=True)


# --- the broker ---------------------------------------------------------------------------------------------------


class MqttBroker:
    """Sessions by client id, the subscription tree, the retained messages, and the listening socket."""

    def __init__(self, host: str, port: int, *, limits: BrokerLimits | None = None) -> None:
        self.host = host
        self.port = port  # 0: any free port, known after start()
        self.limits = limits or BrokerLimits()
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._sessions: dict[str, Session] = {}
        self._subscriptions: SubscriptionTree[Session] = SubscriptionTree()
        self._retained = RetainedStore()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # A fleet reconnecting at once after a restart must not overflow the accept queue (asyncio's default: 100).
        self._server = await loop.create_server(lambda: _Connection(self), self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, close every connection (no wills) and forget all sessions and retained messages."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        while self._connections:
            connections = list(self._connections)
            for connection in connections:
                connection.shut_down()
            await asyncio.gather(*(c.closed for c in connections))
        await server.wait_closed()
        self._sessions.clear()
        self._subscriptions = SubscriptionTree()
        self._retained = RetainedStore()

    def publish(self, message: Message) -> None:
        """Route a message to every matching session (once each, at the lower of its QoS and the best grant) with
        the retain flag cleared, as live messages carry it (§3.3.1.3); keep it first if it is retained."""
        if message.retain:
            self._retained.keep(message)
        for session, granted in self._subscriptions.match(message.topic).items():
            session.deliver(message, min(granted, message.qos), retain=False)

    # for connections

    def add_connection(self, connection: _Connection) -> bool:
        """Register a new connection; False once stop() has begun (an accept that raced it)."""
        if self._server is None:
            return False
        self._connections.add(connection)
        return True

    def remove_connection(self, connection: _Connection) -> None:
        self._connections.discard(connection)

    def attach(self, connection: _Connection, client_id: str, clean_session: bool) -> tuple[Session, bool]:
        """The session for a CONNECT and whether it was present. A connection that holds the client id is closed
        (its will goes, as with Mosquitto); clean session discards what was kept (§3.1.2.4)."""
        session = self._sessions.get(client_id)
        if session is not None and session.connection is not None:
            session.connection.close(f"taken over by a new connection from {connection.peer}", logging.WARNING)
            session = self._sessions.get(client_id)  # a clean session was discarded with its connection
        if session is not None and clean_session:
            self._discard(session)
            session = None
        present = session is not None
        if session is None:
            session = self._sessions[client_id] = Session(client_id, not clean_session, self.limits)
        session.connection = connection
        return session, present

    def detach(self, connection: _Connection) -> None:
        """Let a closing connection's session go: kept if persistent, discarded otherwise."""
        session = connection.session
        if session is None or session.connection is not connection:
            return  # never connected, or taken over
        session.connection = None
        if not session.persistent:
            self._discard(session)

    def subscribe(self, session: Session, topic_filter: str, qos: int) -> None:
        session.subscriptions[topic_filter] = qos
        self._subscriptions.add(topic_filter, session, qos)

    def unsubscribe(self, session: Session, topic_filter: str) -> None:
        if session.subscriptions.pop(topic_filter, None) is not None:
            self._subscriptions.remove(topic_filter, session)

    def retained_for(self, granted: list[tuple[str, int]]) -> list[tuple[Message, int]]:
        """The retained messages for a client's new subscriptions only (never for others' filters), each once at
        the best QoS its filters grant."""
        best: dict[str, tuple[Message, int]] = {}
        for topic_filter, granted_qos in granted:
            for message in self._retained.matching(topic_filter):
                qos = min(granted_qos, message.qos)
                if message.topic not in best or best[message.topic][1] < qos:
                    best[message.topic] = (message, qos)
        return list(best.values())

    def _discard(self, session: Session) -> None:
        for topic_filter in session.subscriptions:
            self._subscriptions.remove(topic_filter, session)
        session.subscriptions.clear()
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
