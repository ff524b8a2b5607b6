"""MQTT 3.1.1 packets as fedfleet's embedded broker (`server.ingest.mqtt_broker`) and the coordinator's own client
(`server.ingest.mqtt_client`) read and write them: decoding with every length checked, encoding without copying a
payload, and the rules for topic names and filters.

Decoding is per side: `decode_packet` reads what a client may send (a server-only packet from a client is
malformed), `decode_server_packet` what a server may send. `PacketReader` cuts a byte stream into packets for
either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Generic, TypeVar

__all__ = [
    "ConnectRefused",
    "MalformedPacket",
    "Message",
    "PacketReader",
    "decode_packet",
    "decode_server_packet",
    "encode_connect",
    "encode_subscribe",
    "is_valid_topic_filter",
    "is_valid_topic_name",
    "topic_matches",
]

PROTOCOL_LEVEL = 4  # MQTT 3.1.1
MAX_PACKET_ID = 0xFFFF
MAX_REMAINING_LENGTH = 268_435_455  # four bytes of seven bits each (§2.2.3)
SUBACK_FAILURE = 0x80


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
    """PUBACK, PUBREC, PUBREL or PUBCOMP (or UNSUBACK, from a server): a packet id and nothing else."""

    kind: PacketType
    packet_id: int


@dataclass(frozen=True, slots=True)
class Signal:
    """PINGREQ, PINGRESP or DISCONNECT: a packet type and nothing else."""

    kind: PacketType


Packet = Connect | Publish | Subscribe | Unsubscribe | Acknowledgement | Signal


@dataclass(frozen=True, slots=True)
class ConnAck:
    session_present: bool
    return_code: int


@dataclass(frozen=True, slots=True)
class SubAck:
    packet_id: int
    return_codes: tuple[int, ...]  # the granted QoS per filter, in the SUBSCRIBE's order, or SUBACK_FAILURE


ServerPacket = Publish | Acknowledgement | ConnAck | SubAck | Signal
"""What a server sends a client."""


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


def decode_server_packet(first_byte: int, body: memoryview) -> ServerPacket:
    """One packet a server sent, from its first byte and its body. Raises MalformedPacket for anything a server does
    not send (CONNECT, SUBSCRIBE, PINGREQ, ...) or does not send like that."""
    kind, flags = first_byte >> 4, first_byte & 0x0F
    fields = _Fields(body)
    if kind == PacketType.PUBLISH:
        return _decode_publish(flags, fields)
    if flags != (0b0010 if kind == PacketType.PUBREL else 0):
        raise MalformedPacket(f"fixed header flags {flags:#06b} on packet type {kind}")
    packet: ServerPacket
    if kind in (PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBREL, PacketType.PUBCOMP, PacketType.UNSUBACK):
        packet = Acknowledgement(PacketType(kind), fields.packet_id())
    elif kind == PacketType.CONNACK:
        session_present = fields.byte()
        if session_present > 1:
            raise MalformedPacket(f"CONNACK flags {session_present:#04x}")
        packet = ConnAck(bool(session_present), fields.byte())
    elif kind == PacketType.SUBACK:
        packet_id, codes = fields.packet_id(), []
        while not fields.at_end():
            codes.append(fields.byte())
        packet = SubAck(packet_id, tuple(codes))
    elif kind == PacketType.PINGRESP:
        packet = Signal(PacketType.PINGRESP)
    elif kind in (PacketType.CONNECT, PacketType.SUBSCRIBE, PacketType.UNSUBSCRIBE, PacketType.PINGREQ):
        raise MalformedPacket(f"a server sent {PacketType(kind).name}, which only a client sends")
    else:
        raise MalformedPacket(f"packet type {kind} from a server")
    fields.expect_end(PacketType(kind).name)
    return packet


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


P = TypeVar("P")


class PacketReader(Generic[P]):
    """Cuts one connection's byte stream into packets, each read by `decode` (`decode_packet` on a server,
    `decode_server_packet` on a client). It holds at most one unfinished packet, and refuses one announced over
    `max_packet_size` as soon as its header is in, before a byte of its body has to be buffered."""

    def __init__(self, max_packet_size: int, decode: Callable[[int, memoryview], P]) -> None:
        self._buffer = bytearray()
        self._start = 0  # where the next packet begins; consumed bytes are cut off once a packet is incomplete
        self._max_packet_size = max_packet_size
        self._decode = decode

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_packet(self) -> P | None:
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
            packet = self._decode(buffer[start], view[index:end])
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
PINGREQ = _packet(PacketType.PINGREQ, b"")
DISCONNECT = _packet(PacketType.DISCONNECT, b"")


def _string(text: str) -> bytes:
    encoded = text.encode()
    return len(encoded).to_bytes(2, "big") + encoded


def encode_connect(client_id: str, keepalive: int, clean_session: bool) -> bytes:
    """A CONNECT without will, user name or password (the coordinator's client authenticates with its TLS
    certificate where the broker asks for one)."""
    return _packet(
        PacketType.CONNECT,
        _string("MQTT")
        + bytes((PROTOCOL_LEVEL, clean_session << 1))
        + keepalive.to_bytes(2, "big")
        + _string(client_id),
    )


def encode_subscribe(packet_id: int, requests: list[tuple[str, int]]) -> bytes:
    body = packet_id.to_bytes(2, "big") + b"".join(_string(f) + bytes((qos,)) for f, qos in requests)
    return _packet(PacketType.SUBSCRIBE, body, 0b0010)


def encode_publish_header(
    topic: str, payload_size: int, qos: int, retain: bool, packet_id: int = 0, dup: bool = False
) -> bytes:
    """A PUBLISH up to its payload: the payload follows as a buffer of its own, so it is never copied to build a
    packet."""
    variable = _string(topic) + (packet_id.to_bytes(2, "big") if qos else b"")
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
