"""A small MQTT 3.1.1 broker in asyncio and the standard library: the one `fedfleet serve` runs on loopback when it
is given no broker.

Why our own (docs/adr/0002-broker-choice.md): the coordinator on one machine needs a broker inside its process, and
the Python broker embedded before pinned a typer that Flower cannot share and had to be patched for cross-client
retained delivery. What fedfleet's clients (paho-mqtt 2, aiomqtt) use of MQTT 3.1.1 fits in this module: QoS 0, 1
and 2 both ways, retained messages, wills, keepalive, persistent sessions, client-id takeover. It is for loopback
only: no TLS, no authentication or ACLs (a username and password are accepted and ignored), no MQTT 3.1 or 5, no
`$SYS` topics, no QoS 0 queueing for offline sessions, nothing kept on disk (it lives in the coordinator's process;
a restart starts it empty, without sessions or retained messages).

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
from enum import IntEnum
from typing import Generic, TypeVar, cast

__all__ = [
    "BrokerLimits",
    "ConnectRefused",
    "MalformedPacket",
    "Message",
    "MqttBroker",
    "PacketReader",
    "RetainedStore",
    "SubscriptionTree",
    "is_valid_topic_filter",
    "is_valid_topic_name",
    "topic_matches",
]

logger = logging.getLogger(__name__)

PROTOCOL_LEVEL = 4  # MQTT 3.1.1
MAX_PACKET_ID = 0xFFFF
MAX_REMAINING_LENGTH = 268_435_455  # four bytes of seven bits each (§2.2.3)
SUBACK_FAILURE = 0x80


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


# --- errors -------------------------------------------------------------------------------------------------------


class MalformedPacket(Exception):
    """The peer broke the protocol; its connection is closed. The message says how, for the one log line."""


class ConnectRefused(Exception):
    """A CONNECT answered with a CONNACK return code other than 0, after which the connection is closed."""

    def __init__(self, return_code: ConnectReturnCode, reason: str) -> None:
        super().__init__(reason)
        self.return_code = return_code


# --- packets ------------------------------------------------------------------------------------------------------


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


class ConnectReturnCode(IntEnum):
    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2


@dataclass(frozen=True, slots=True)
class Message:
    """An application message as the broker routes and keeps it: the topic, payload, QoS and retain flag of a
    PUBLISH (or of a will). One object is shared by every subscriber and queue it goes to; the payload is never
    copied on the way."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str
    clean_session: bool
    keepalive: int
    will: Message | None


@dataclass(frozen=True, slots=True)
class Publish:
    message: Message
    packet_id: int  # 0 for QoS 0
    dup: bool


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    requests: tuple[tuple[str, int], ...]  # (topic filter, requested QoS); a filter may be invalid (SUBACK 0x80)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    filters: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Acknowledgement:
    """PUBACK, PUBREC, PUBREL or PUBCOMP: a packet id and nothing else."""

    kind: PacketType
    packet_id: int


@dataclass(frozen=True, slots=True)
class Signal:
    """PINGREQ or DISCONNECT: a packet type and nothing else."""

    kind: PacketType


Packet = Connect | Publish | Subscribe | Unsubscribe | Acknowledgement | Signal


# --- decoding -----------------------------------------------------------------------------------------------------


class _Fields:
    """Reads MQTT fields from one packet's body, refusing to run past its end (a length that lies is malformed)."""

    __slots__ = ("_body", "_pos")

    def __init__(self, body: memoryview) -> None:
        self._body = body
        self._pos = 0

    def _take(self, size: int) -> memoryview:
        end = self._pos + size
        if end > len(self._body):
            raise MalformedPacket("a field runs past the end of its packet")
        chunk, self._pos = self._body[self._pos : end], end
        return chunk

    def byte(self) -> int:
        return self._take(1)[0]

    def uint16(self) -> int:
        return int.from_bytes(self._take(2), "big")

    def packet_id(self) -> int:
        packet_id = self.uint16()
        if packet_id == 0:
            raise MalformedPacket("packet id 0")
        return packet_id

    def binary(self) -> bytes:
        return bytes(self._take(self.uint16()))

    def text(self) -> str:
        """A UTF-8 string as §1.5.3 wants it: well formed (no surrogates) and without U+0000."""
        try:
            text = str(self._take(self.uint16()), "utf-8")
        except UnicodeDecodeError as e:
            raise MalformedPacket(f"invalid UTF-8 ({e.reason})") from None
        if "\x00" in text:
            raise MalformedPacket("U+0000 in a string")
        return text

    def rest(self) -> bytes:
        return bytes(self._take(len(self._body) - self._pos))

    def at_end(self) -> bool:
        return self._pos == len(self._body)

    def expect_end(self, what: str) -> None:
        if not self.at_end():
            raise MalformedPacket(f"{len(self._body) - self._pos} stray bytes after {what}")


def decode_packet(first_byte: int, body: memoryview) -> Packet:
    """One packet from its first byte and its body (what follows the remaining length). Raises MalformedPacket, or
    ConnectRefused for a CONNECT of another protocol level."""
    kind, flags = first_byte >> 4, first_byte & 0x0F
    fields = _Fields(body)
    if kind == PacketType.PUBLISH:
        return _decode_publish(flags, fields)
    expected_flags = 0b0010 if kind in (PacketType.PUBREL, PacketType.SUBSCRIBE, PacketType.UNSUBSCRIBE) else 0
    if flags != expected_flags:
        raise MalformedPacket(f"fixed header flags {flags:#06b} on packet type {kind}")
    if kind == PacketType.CONNECT:
        return _decode_connect(fields)
    if kind == PacketType.SUBSCRIBE:
        return _decode_subscribe(fields)
    if kind == PacketType.UNSUBSCRIBE:
        packet_id, filters = fields.packet_id(), []
        while not fields.at_end():
            filters.append(fields.text())
        if not filters:
            raise MalformedPacket("UNSUBSCRIBE without a topic filter")
        return Unsubscribe(packet_id, tuple(filters))
    if kind in (PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBREL, PacketType.PUBCOMP):
        acknowledgement = Acknowledgement(PacketType(kind), fields.packet_id())
        fields.expect_end(acknowledgement.kind.name)
        return acknowledgement
    if kind in (PacketType.PINGREQ, PacketType.DISCONNECT):
        fields.expect_end(PacketType(kind).name)
        return Signal(PacketType(kind))
    if kind in (PacketType.CONNACK, PacketType.SUBACK, PacketType.UNSUBACK, PacketType.PINGRESP):
        raise MalformedPacket(f"a client sent {PacketType(kind).name}, which only a server sends")
    raise MalformedPacket(f"reserved packet type {kind}")


def _decode_connect(fields: _Fields) -> Connect:
    name, level = fields.text(), fields.byte()
    if (name, level) != ("MQTT", PROTOCOL_LEVEL):
        if name in ("MQTT", "MQIsdp"):
            raise ConnectRefused(
                ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION, f"protocol level {level}; this broker speaks 4"
            )
        raise MalformedPacket(f"protocol name {name!r}")
    flags = fields.byte()
    will_flag, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 0x03, bool(flags & 0x20)
    has_password, has_username = bool(flags & 0x40), bool(flags & 0x80)
    if flags & 0x01:
        raise MalformedPacket("reserved CONNECT flag set")
    if will_qos == 3 or (not will_flag and (will_qos or will_retain)):
        raise MalformedPacket(f"will flags {flags:#04x}")
    if has_password and not has_username:
        raise MalformedPacket("a password without a user name")
    keepalive, client_id = fields.uint16(), fields.text()
    will = None
    if will_flag:
        topic = fields.text()
        if not is_valid_topic_name(topic):
            raise MalformedPacket(f"will topic {topic!r} is not a valid topic name")
        will = Message(topic, fields.binary(), will_qos, will_retain)
    if has_username:
        fields.text()  # accepted and ignored: the embedded broker serves loopback only
    if has_password:
        fields.binary()
    fields.expect_end("CONNECT")
    return Connect(client_id, bool(flags & 0x02), keepalive, will)


def _decode_subscribe(fields: _Fields) -> Subscribe:
    packet_id, requests = fields.packet_id(), []
    while not fields.at_end():
        topic_filter, qos = fields.text(), fields.byte()
        if qos > 2:  # reserved bits set, or QoS 3 (§3.8.3.1)
            raise MalformedPacket(f"requested QoS byte {qos:#04x}")
        requests.append((topic_filter, qos))
    if not requests:
        raise MalformedPacket("SUBSCRIBE without a topic filter")
    return Subscribe(packet_id, tuple(requests))


def _decode_publish(flags: int, fields: _Fields) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")
    topic = fields.text()
    if not is_valid_topic_name(topic):
        raise MalformedPacket(f"PUBLISH topic {topic!r} is empty or has a wildcard")
    packet_id = fields.packet_id() if qos else 0
    return Publish(Message(topic, fields.rest(), qos, bool(flags & 0x01)), packet_id, bool(flags & 0x08))


class PacketReader:
    """Cuts one connection's byte stream into packets. It holds at most one unfinished packet, and refuses one
    announced over `max_packet_size` as soon as its header is in, before a byte of its body has to be buffered."""

    def __init__(self, max_packet_size: int) -> None:
        self._buffer = bytearray()
        self._start = 0  # where the next packet begins; consumed bytes are cut off once a packet is incomplete
        self._max_packet_size = max_packet_size

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_packet(self) -> Packet | None:
        """The next whole packet, or None until more bytes come. Raises MalformedPacket or ConnectRefused."""
        buffer, start = self._buffer, self._start
        length, index = 0, start + 1
        for shift in (0, 7, 14, 21):
            if index >= len(buffer):
                self._compact()
                return None
            byte = buffer[index]
            index += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
        else:
            raise MalformedPacket("remaining length longer than four bytes")
        end = index + length
        if end - start > self._max_packet_size:
            raise MalformedPacket(f"a packet of {end - start} bytes, over the limit of {self._max_packet_size}")
        if end > len(buffer):
            self._compact()
            return None
        with memoryview(buffer) as view:  # decoded without copying the body; only the payload is copied out
            packet = decode_packet(buffer[start], view[index:end])
        self._start = end
        return packet

    def _compact(self) -> None:
        """Cut off the packets already read; done only while waiting for more, so a burst is not copied per packet."""
        if self._start:
            del self._buffer[: self._start]
            self._start = 0


# --- encoding -----------------------------------------------------------------------------------------------------


def encode_remaining_length(length: int) -> bytes:
    encoded = bytearray()
    while True:
        length, byte = divmod(length, 128)
        if not length:
            encoded.append(byte)
            return bytes(encoded)
        encoded.append(byte | 0x80)


def _packet(kind: PacketType, body: bytes, flags: int = 0) -> bytes:
    return bytes((kind << 4 | flags,)) + encode_remaining_length(len(body)) + body


def encode_connack(session_present: bool, return_code: ConnectReturnCode) -> bytes:
    return _packet(PacketType.CONNACK, bytes((session_present, return_code)))


def encode_acknowledgement(kind: PacketType, packet_id: int) -> bytes:
    return _packet(kind, packet_id.to_bytes(2, "big"), 0b0010 if kind == PacketType.PUBREL else 0)


def encode_suback(packet_id: int, return_codes: list[int]) -> bytes:
    return _packet(PacketType.SUBACK, packet_id.to_bytes(2, "big") + bytes(return_codes))


def encode_unsuback(packet_id: int) -> bytes:
    return _packet(PacketType.UNSUBACK, packet_id.to_bytes(2, "big"))


PINGRESP = _packet(PacketType.PINGRESP, b"")


def encode_publish_header(
    topic: str, payload_size: int, qos: int, retain: bool, packet_id: int = 0, dup: bool = False
) -> bytes:
    """A PUBLISH up to its payload: the payload follows as a buffer of its own, so it is never copied to build a
    packet."""
    encoded_topic = topic.encode()
    variable = len(encoded_topic).to_bytes(2, "big") + encoded_topic + (packet_id.to_bytes(2, "big") if qos else b"")
    first = PacketType.PUBLISH << 4 | dup << 3 | qos << 1 | retain
    return bytes((first,)) + encode_remaining_length(len(variable) + payload_size) + variable


# --- topics -------------------------------------------------------------------------------------------------------


def is_valid_topic_name(topic: str) -> bool:
    """A topic a message can be published to: not empty, no wildcard (§4.7.3)."""
    return bool(topic) and "+" not in topic and "#" not in topic


def is_valid_topic_filter(topic_filter: str) -> bool:
    """Not empty; `#` only as the whole last level, `+` only as a whole level (§4.7.1)."""
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether a valid filter matches a valid topic name (§4.7): `+` is one level, `#` any number of levels at the
    end (the parent included: `a/#` matches `a`), and a filter starting with a wildcard does not match a topic
    starting with `$` (§4.7.2). The trees below must agree with this, which the tests check."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels, topic_levels = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True
        if i >= len(topic_levels) or (level not in ("+", topic_levels[i])):
            return False
    return len(filter_levels) == len(topic_levels)


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
        self._reader = PacketReader(self._limits.max_packet_size)
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
