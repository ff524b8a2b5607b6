"""The embedded broker: loopback only, each client gets only its own retained state, a connect storm holds; and
fedfleet's own MQTT 3.1.1 broker under it, spoken to by real clients (paho-mqtt, aiomqtt) and, for bytes no real
client sends, by raw sockets. Every wait is bounded; the broker's order guarantee (messages to one client leave in
the order it received them) lets a test prove that something did *not* arrive: a marker sent after it comes first.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import socket
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import aiomqtt
import paho.mqtt.client as paho
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.contract import Topics
from server.errors import CoordinatorError
from server.ingest.broker import EmbeddedBroker, free_port
from server.ingest.mqtt_broker import BrokerLimits, RetainedStore, SubscriptionTree
from server.ingest.mqtt_codec import (
    MalformedPacket,
    Message,
    PacketReader,
    decode_packet,
    is_valid_topic_filter,
    topic_matches,
)

T = Topics()
MARKER = b"live marker"
TIMEOUT = 10.0
BROKER_LOGGER = "server.ingest.mqtt_broker"


def test_refuses_to_listen_beyond_loopback() -> None:
    for listen in ("0.0.0.0:1883", "192.0.2.7:1883", "example.org:1883"):
        with pytest.raises(CoordinatorError, match="only binds loopback"):
            EmbeddedBroker(listen)


async def _device(port: int, device: str, got: dict[str, list[tuple[str, bytes]]], ready: asyncio.Event) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier=device) as client:
        await client.subscribe(T.desired(device), qos=1)
        ready.set()
        async for message in client.messages:
            got[device].append((message.topic.value, bytes(message.payload)))  # type: ignore[arg-type]


@pytest.mark.slow
def test_each_client_receives_only_its_own_retained_state_during_a_connect_storm() -> None:
    devices = [f"pi-{i}" for i in range(60)]

    async def scenario() -> dict[str, list[tuple[str, bytes]]]:
        broker = EmbeddedBroker(f"127.0.0.1:{free_port()}")
        await broker.start()
        got: dict[str, list[tuple[str, bytes]]] = {d: [] for d in devices}
        try:
            # Like the coordinator, a client holds a wildcard subscription over every device's topics.
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier="coordinator") as c:
                await c.subscribe(f"{T.prefix}/devices/+/desired", qos=1)
                for d in devices[:30]:
                    await c.publish(T.desired(d), f"for {d}".encode(), qos=1, retain=True)
                readies = [asyncio.Event() for _ in devices]
                tasks = [
                    asyncio.create_task(_device(broker.port, d, got, r)) for d, r in zip(devices, readies, strict=True)
                ]
                await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 20)
                # Then a live (not retained) marker to every device: it arrives after anything retained for
                # that device, so once every device has its marker, every delivery is in.
                for d in devices:
                    await c.publish(T.desired(d), MARKER, qos=1)

                async def all_marked() -> None:
                    while not all(got[d] and got[d][-1][1] == MARKER for d in devices):
                        await asyncio.sleep(0.02)

                await asyncio.wait_for(all_marked(), 30)
                for t in tasks:
                    assert not t.done(), t  # no client was dropped
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await broker.stop()
        return got

    got = asyncio.run(scenario())
    for i, d in enumerate(devices):
        expected = [(T.desired(d), f"for {d}".encode())] if i < 30 else []
        assert got[d] == [*expected, (T.desired(d), MARKER)], d


# --- the matcher and the trees, without sockets --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        # MQTT 3.1.1 §4.7.1 and §4.7.2, example by example.
        ("sport/tennis/player1/#", "sport/tennis/player1", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
        ("sport/#", "sport", True),
        ("#", "any/thing/at/all", True),
        ("sport/tennis/+", "sport/tennis/player1", True),
        ("sport/tennis/+", "sport/tennis/player1/ranking", False),
        ("sport/+", "sport", False),
        ("sport/+", "sport/", True),
        ("+/+", "/finance", True),
        ("/+", "/finance", True),
        ("+", "/finance", False),
        ("#", "$SYS/broker/load", False),
        ("+/monitor/Clients", "$SYS/monitor/Clients", False),
        ("$SYS/#", "$SYS/monitor/Clients", True),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
        ("a/b", "a/b", True),
        ("a/b", "a/B", False),
        ("a/+", "a/$c", True),  # only a topic's first level is special
    ],
)
def test_topic_matching_follows_the_spec(topic_filter: str, topic: str, matches: bool) -> None:
    assert topic_matches(topic_filter, topic) is matches


def test_topic_filter_validity() -> None:
    for valid in ("sport/tennis/#", "#", "+", "+/tennis/#", "sport/+/player1", "/", "a//b", "$SYS/#"):
        assert is_valid_topic_filter(valid), valid
    for invalid in ("", "sport/tennis#", "sport/tennis/#/ranking", "sport+", "#/a", "a/#b", "++", "a/+b/c"):
        assert not is_valid_topic_filter(invalid), invalid


LEVELS = st.sampled_from(["a", "b", "$s", ""])
TOPICS = st.lists(LEVELS, min_size=1, max_size=4).map("/".join).filter(bool)
FILTERS = st.lists(st.sampled_from(["a", "b", "$s", "", "+", "#"]), min_size=1, max_size=4).map("/".join)


@given(
    subscriptions=st.lists(st.tuples(FILTERS.filter(is_valid_topic_filter), st.integers(0, 2), st.integers(0, 2))),
    topics=st.lists(TOPICS, min_size=1, max_size=8),
    removed=st.sets(st.integers(0, 20)),
)
def test_subscription_tree_agrees_with_the_matcher(
    subscriptions: list[tuple[str, int, int]], topics: list[str], removed: set[int]
) -> None:
    tree: SubscriptionTree[int] = SubscriptionTree()
    held: dict[tuple[int, str], int] = {}  # (subscriber, filter) -> QoS, the last subscription winning
    for topic_filter, subscriber, qos in subscriptions:
        tree.add(topic_filter, subscriber, qos)
        held[(subscriber, topic_filter)] = qos
    for i, (topic_filter, subscriber, _) in enumerate(subscriptions):
        if i in removed:
            tree.remove(topic_filter, subscriber)
            held.pop((subscriber, topic_filter), None)

    for topic in topics:
        expected: dict[int, int] = {}
        for (subscriber, topic_filter), qos in held.items():
            if topic_matches(topic_filter, topic):
                expected[subscriber] = max(qos, expected.get(subscriber, 0))
        assert tree.match(topic) == expected, topic


@given(kept=st.lists(TOPICS, max_size=8), deleted=st.lists(TOPICS, max_size=4), filters=st.lists(FILTERS, max_size=6))
def test_retained_store_agrees_with_the_matcher(kept: list[str], deleted: list[str], filters: list[str]) -> None:
    store = RetainedStore()
    for topic in kept:
        store.keep(Message(topic, b"first", 1, True))
        store.keep(Message(topic, topic.encode(), 1, True))  # replaced
    for topic in deleted:
        store.keep(Message(topic, b"", 1, True))
    present = set(kept) - set(deleted)
    assert len(store) == len(present)

    for topic_filter in filter(is_valid_topic_filter, filters):
        found = store.matching(topic_filter)
        assert sorted(m.topic for m in found) == sorted(t for t in present if topic_matches(topic_filter, t))
        assert all(m.payload == m.topic.encode() for m in found)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return len(data).to_bytes(2, "big") + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def connect_packet(
    client_id: str = "",
    clean: bool = True,
    keepalive: int = 0,
    will: tuple[str, bytes, int, bool] | None = None,
    level: int = 4,
    name: str = "MQTT",
) -> bytes:
    flags, payload = clean << 1, _string(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | qos << 3 | retain << 5
        payload += _string(topic) + _string(message)
    return _packet(0x10, _string(name) + bytes((level, flags)) + keepalive.to_bytes(2, "big") + payload)


def publish_packet(
    topic: str | bytes, payload: bytes, qos: int = 0, packet_id: int = 0, retain: bool = False, dup: bool = False
) -> bytes:
    first = 0x30 | dup << 3 | qos << 1 | retain
    return _packet(first, _string(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload)


def subscribe_packet(packet_id: int, *requests: tuple[str, int]) -> bytes:
    return _packet(0x82, packet_id.to_bytes(2, "big") + b"".join(_string(f) + bytes((q,)) for f, q in requests))


def ack_packet(first: int, packet_id: int) -> bytes:
    return _packet(first, packet_id.to_bytes(2, "big"))


PUBACK, PUBREC, PUBREL, PUBCOMP, DISCONNECT = 0x40, 0x50, 0x62, 0x70, b"\xe0\x00"


def test_packet_reader_reassembles_split_and_coalesced_packets() -> None:
    stream = connect_packet("pi-1", will=("w", b"gone", 1, True)) + publish_packet(
        "a/b", b"x" * 300, qos=1, packet_id=9
    )
    one_by_one = PacketReader(1024, decode_packet)
    packets = []
    for byte in stream:
        one_by_one.feed(bytes((byte,)))
        while (packet := one_by_one.next_packet()) is not None:
            packets.append(packet)
    at_once = PacketReader(1024, decode_packet)
    at_once.feed(stream)
    assert [at_once.next_packet(), at_once.next_packet(), at_once.next_packet()] == [*packets, None]
    assert len(packets) == 2
    connect, publish = packets
    assert connect.client_id == "pi-1" and connect.will == Message("w", b"gone", 1, True)  # type: ignore[union-attr]
    assert publish.message == Message("a/b", b"x" * 300, 1, False) and publish.packet_id == 9  # type: ignore[union-attr]

    # A packet announced over the limit is refused at its header, before its body.
    oversize = PacketReader(1024, decode_packet)
    oversize.feed(b"\x30" + _varint(2000))
    with pytest.raises(MalformedPacket, match="over the limit"):
        oversize.next_packet()


# --- a broker in a thread of its own, real clients -------------------------------------------------------------------


class BrokerThread:
    """The embedded broker in an event loop of its own thread, as a broker process would be: blocking clients (paho's
    network thread, raw sockets) and asyncio clients in a test's own loop talk to it alike."""

    def __init__(self, limits: BrokerLimits | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="embedded-broker", daemon=True)
        self.thread.start()
        self.broker = EmbeddedBroker(f"127.0.0.1:{free_port()}", limits=limits)
        self.port = self.broker.port
        asyncio.run_coroutine_threadsafe(self.broker.start(), self.loop).result(TIMEOUT)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.broker.stop(), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


@pytest.fixture
def start_broker() -> Iterator[Callable[..., BrokerThread]]:
    started: list[BrokerThread] = []

    def start(limits: BrokerLimits | None = None) -> BrokerThread:
        started.append(BrokerThread(limits))
        return started[-1]

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def broker(start_broker: Callable[..., BrokerThread]) -> BrokerThread:
    return start_broker()


class PahoClient:
    """A paho-mqtt client on its network thread, its callbacks turned into queues that the test waits on."""

    def __init__(self, port: int, client_id: str, clean_session: bool = True) -> None:
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self._connacks: queue.Queue[bool] = queue.Queue()
        self._subacks: queue.Queue[list[int]] = queue.Queue()
        self.dropped = threading.Event()
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session)
        client.on_connect = lambda _c, _u, flags, _reason, _p: self._connacks.put(flags.session_present)
        client.on_subscribe = lambda _c, _u, _mid, reasons, _p: self._subacks.put([r.value for r in reasons])
        client.on_message = lambda _c, _u, message: self.messages.put(message)
        client.on_disconnect = lambda *_: self.dropped.set()
        client.connect("127.0.0.1", port)
        client.loop_start()
        self.client = client
        self.session_present = self._connacks.get(timeout=TIMEOUT)

    def __enter__(self) -> PahoClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.disconnect()

    def subscribe(self, topic_filter: str, qos: int) -> list[int]:
        self.client.subscribe(topic_filter, qos)
        return self._subacks.get(timeout=TIMEOUT)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos, retain)
        info.wait_for_publish(TIMEOUT)  # QoS 1: PUBACK came; QoS 2: PUBCOMP came
        assert info.is_published()

    def next_message(self) -> paho.MQTTMessage:
        return self.messages.get(timeout=TIMEOUT)

    def disconnect(self) -> None:
        if self.client.is_connected():
            self.client.disconnect()
            assert self.dropped.wait(TIMEOUT)
        self.client.loop_stop()


class RawClient:
    """A bare TCP connection to the broker, for the bytes no real client would send and for the steps a real client
    takes on its own (acknowledging, closing without DISCONNECT)."""

    def __init__(self, port: int, receive_buffer: int | None = None) -> None:
        self.sock = socket.socket()
        if receive_buffer:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(("127.0.0.1", port))

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError("the broker closed the connection")
            data += chunk
        return data

    def read_packet(self) -> tuple[int, bytes]:
        first, length, shift = self._exactly(1)[0], 0, 0
        while True:
            byte = self._exactly(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return first, self._exactly(length)

    def connect(self, client_id: str, **options: Any) -> bool:
        """CONNECT, expecting acceptance; whether the session was present."""
        self.send(connect_packet(client_id, **options))
        first, body = self.read_packet()
        assert (first, body[1]) == (0x20, 0), (first, body)
        return bool(body[0])

    def subscribe(self, packet_id: int, *requests: tuple[str, int]) -> bytes:
        """SUBSCRIBE; the SUBACK's return codes."""
        self.send(subscribe_packet(packet_id, *requests))
        first, body = self.read_packet()
        assert (first, body[:2]) == (0x90, packet_id.to_bytes(2, "big")), (first, body)
        return body[2:]

    def wait_closed_by_broker(self) -> None:
        """Read (and discard) until the broker closes the connection; a timeout fails the test."""
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass


class RawPublish(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    packet_id: int
    dup: bool
    retain: bool


def parse_publish(first: int, body: bytes) -> RawPublish:
    assert first >> 4 == 3, hex(first)
    qos, size = (first >> 1) & 3, int.from_bytes(body[:2], "big")
    rest = body[2 + size :]
    packet_id = int.from_bytes(rest[:2], "big") if qos else 0
    return RawPublish(
        body[2 : 2 + size].decode(), rest[2:] if qos else rest, qos, packet_id, bool(first & 8), bool(first & 1)
    )


def aio(port: int, identifier: str, **options: Any) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", port, identifier=identifier, **options)


async def next_message(client: aiomqtt.Client) -> aiomqtt.Message:
    return await asyncio.wait_for(anext(client.messages), TIMEOUT)


def seen(message: aiomqtt.Message) -> tuple[str, bytes, int, bool]:
    return message.topic.value, bytes(message.payload), message.qos, message.retain  # type: ignore[arg-type]


def test_a_busy_port_is_one_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        broker = EmbeddedBroker(f"127.0.0.1:{taken.getsockname()[1]}")
        with pytest.raises(CoordinatorError, match="cannot listen on"):
            asyncio.run(broker.start())


def test_retained_messages_are_set_replaced_deleted_and_flagged_only_for_a_new_subscription(
    broker: BrokerThread,
) -> None:
    topic = "r/devices/pi-1/desired"

    async def scenario() -> None:
        async with aio(broker.port, "setter") as setter, aio(broker.port, "early") as early:
            await setter.publish(topic, b"v1", qos=1, retain=True)
            await early.subscribe(topic, qos=1)
            assert seen(await next_message(early)) == (topic, b"v1", 1, True)
            await setter.publish(topic, b"v2", qos=1, retain=True)
            assert seen(await next_message(early)) == (topic, b"v2", 1, False)  # forwarded live: flag cleared
            async with aio(broker.port, "late") as late:
                await late.subscribe(topic, qos=1)
                assert seen(await next_message(late)) == (topic, b"v2", 1, True)  # replaced: v1 is gone
            await setter.publish(topic, b"", qos=1, retain=True)  # deletes it, and is forwarded like any message
            assert seen(await next_message(early)) == (topic, b"", 1, False)
            async with aio(broker.port, "after") as after:
                await after.subscribe(topic, qos=1)
                await setter.publish(topic, MARKER, qos=1)
                assert seen(await next_message(after)) == (topic, MARKER, 1, False)  # nothing retained before it

    asyncio.run(scenario())


def test_wildcards_match_whole_levels_and_leave_dollar_topics_alone(broker: BrokerThread) -> None:
    async def topics(client: aiomqtt.Client, count: int) -> list[str]:
        return [(await next_message(client)).topic.value for _ in range(count)]

    async def scenario() -> None:
        async with aio(broker.port, "pub") as pub, aio(broker.port, "wild") as wild, aio(broker.port, "all") as every:
            await wild.subscribe("w/+/status", qos=1)
            await wild.subscribe("x/#", qos=1)
            await every.subscribe("#", qos=1)
            await every.subscribe("+/y", qos=1)  # overlaps `#` for a/y
            for topic in ("w/a/status", "w/a/b/status", "w/status", "x", "x/y/z", "$x/y", "a/y", "w/end/status"):
                await pub.publish(topic, b"", qos=1)
            assert await topics(wild, 4) == ["w/a/status", "x", "x/y/z", "w/end/status"]
            # `#` takes every topic but those starting with `$`, and a/y comes once although two filters match.
            expected = ["w/a/status", "w/a/b/status", "w/status", "x", "x/y/z", "a/y", "w/end/status"]
            assert await topics(every, 7) == expected

            await every.subscribe("$x/+", qos=1)  # a `$` topic is reached by a filter that names its first level
            await wild.unsubscribe("x/#")
            for topic in ("$x/y", "x/q", "w/last/status"):
                await pub.publish(topic, b"", qos=1)
            assert await topics(every, 3) == ["$x/y", "x/q", "w/last/status"]
            assert await topics(wild, 1) == ["w/last/status"]

    asyncio.run(scenario())


def test_qos_0_1_and_2_round_trip_at_the_lower_of_published_and_granted_qos(broker: BrokerThread) -> None:
    with PahoClient(broker.port, "subscriber") as sub, PahoClient(broker.port, "publisher") as pub:
        for granted in (0, 1, 2):
            assert sub.subscribe(f"q/{granted}", granted) == [granted]
        for granted in (0, 1, 2):
            for qos in (0, 1, 2):
                pub.publish(f"q/{granted}", str(qos).encode(), qos)  # waits for the broker's PUBACK / PUBCOMP
        got = sorted((m.topic, m.payload, m.qos) for m in (sub.next_message() for _ in range(9)))
    assert got == sorted((f"q/{g}", str(q).encode(), min(g, q)) for g in range(3) for q in range(3))


def test_a_qos_2_message_is_routed_once_however_often_its_packet_id_comes_before_pubrel(broker: BrokerThread) -> None:
    with PahoClient(broker.port, "watcher") as watcher, RawClient(broker.port) as raw:
        watcher.subscribe("q2/t", 2)
        raw.connect("sender")
        for dup in (False, True, True):
            raw.send(publish_packet("q2/t", b"once", qos=2, packet_id=7, dup=dup))
            assert raw.read_packet() == (PUBREC, b"\x00\x07")
        raw.send(ack_packet(PUBREL, 7))
        assert raw.read_packet() == (PUBCOMP, b"\x00\x07")
        raw.send(publish_packet("q2/t", b"released id used again", qos=2, packet_id=7))
        assert raw.read_packet() == (PUBREC, b"\x00\x07")
        # A QoS 2 marker: paho hands a QoS 2 message over at PUBREL, so a QoS 0 one could overtake it.
        raw.send(publish_packet("q2/t", MARKER, qos=2, packet_id=8))
        assert raw.read_packet() == (PUBREC, b"\x00\x08")
        got = [m.payload for m in (watcher.next_message() for _ in range(3))]
    assert got == [b"once", b"released id used again", MARKER]


def test_overlapping_subscriptions_deliver_once_at_the_highest_qos(broker: BrokerThread) -> None:
    async def scenario() -> None:
        async with aio(broker.port, "overlap") as client, aio(broker.port, "pub") as pub:
            await client.subscribe("o/+/c", qos=0)
            await client.subscribe("o/#", qos=2)
            await client.subscribe("o/b/c", qos=1)
            await pub.publish("o/b/c", b"once", qos=2)
            await pub.publish("o/b/c", MARKER, qos=0)
            assert seen(await next_message(client)) == ("o/b/c", b"once", 2, False)
            assert seen(await next_message(client)) == ("o/b/c", MARKER, 0, False)

    asyncio.run(scenario())


def test_a_will_is_published_when_a_connection_drops_without_disconnect(broker: BrokerThread) -> None:
    with PahoClient(broker.port, "watcher") as watcher:
        watcher.subscribe("will/+", 1)
        with RawClient(broker.port) as raw:
            raw.connect("dropper", will=("will/dropper", b"dropped", 1, False))
        message = watcher.next_message()  # the socket closed, no DISCONNECT
    assert (message.topic, message.payload, message.qos) == ("will/dropper", b"dropped", 1)


def test_a_will_is_published_and_retained_when_the_keepalive_expires(broker: BrokerThread) -> None:
    with PahoClient(broker.port, "watcher") as watcher:
        watcher.subscribe("will/+", 1)
        with RawClient(broker.port) as raw:
            raw.connect("sleeper", keepalive=1, will=("will/sleeper", b"silent", 1, True))
            raw.wait_closed_by_broker()  # it sends nothing, not even PINGREQ: closed after 1.5 x its keepalive
        message = watcher.next_message()
        assert (message.topic, message.payload, message.retain) == ("will/sleeper", b"silent", False)
        with PahoClient(broker.port, "latecomer") as late:
            late.subscribe("will/sleeper", 1)
            message = late.next_message()
    assert (message.payload, message.retain) == (b"silent", True)


def test_no_will_after_disconnect(broker: BrokerThread) -> None:
    with PahoClient(broker.port, "watcher") as watcher:
        watcher.subscribe("will/leaver", 1)
        with RawClient(broker.port) as raw:
            raw.connect("leaver", will=("will/leaver", b"left", 1, False))
            raw.send(DISCONNECT)
            raw.wait_closed_by_broker()  # the broker has ended the connection: a will would have gone by now
        watcher.publish("will/leaver", MARKER, 1)
        assert watcher.next_message().payload == MARKER


def test_a_second_connection_with_the_same_client_id_takes_over_and_the_first_ones_will_goes(
    broker: BrokerThread,
) -> None:
    async def scenario() -> None:
        async with aio(broker.port, "watcher") as watcher:
            await watcher.subscribe("will/twin", qos=1)
            async with aio(broker.port, "twin", will=aiomqtt.Will("will/twin", b"taken over", qos=1)) as old:
                new = await asyncio.to_thread(PahoClient, broker.port, "twin")
                try:
                    with pytest.raises(aiomqtt.MqttError):
                        await next_message(old)  # its connection was closed
                    assert seen(await next_message(watcher)) == ("will/twin", b"taken over", 1, False)
                    assert await asyncio.to_thread(new.subscribe, "twin/inbox", 1) == [1]
                    await watcher.publish("twin/inbox", b"hello", qos=1)
                    assert (await asyncio.to_thread(new.next_message)).payload == b"hello"
                finally:
                    await asyncio.to_thread(new.disconnect)

    asyncio.run(scenario())


def test_a_persistent_session_keeps_its_subscriptions_and_qos_1_messages_while_away(broker: BrokerThread) -> None:
    with PahoClient(broker.port, "publisher") as publisher:
        with PahoClient(broker.port, "keeper", clean_session=False) as first:
            assert first.session_present is False
            assert first.subscribe("keep/t", 1) == [1]
        publisher.publish("keep/t", b"while away", qos=1)
        with PahoClient(broker.port, "keeper", clean_session=False) as second:
            assert second.session_present is True
            message = second.next_message()  # without subscribing again
            assert (message.topic, message.payload, message.qos) == ("keep/t", b"while away", 1)
        publisher.publish("keep/t", b"for a session that a clean one discards", qos=1)
        with PahoClient(broker.port, "keeper", clean_session=True) as third:
            assert third.session_present is False
            third.subscribe("keep/marker", 1)
            publisher.publish("keep/t", b"no subscription any more", qos=1)
            publisher.publish("keep/marker", MARKER, qos=1)
            assert third.next_message().payload == MARKER


def test_unacknowledged_messages_go_again_with_dup_when_the_session_resumes(broker: BrokerThread) -> None:
    with PahoClient(broker.port, "publisher") as publisher:
        with RawClient(broker.port) as first:
            first.connect("forgetful", clean=False)
            assert first.subscribe(1, ("dup/1", 1), ("dup/2", 2)) == b"\x01\x02"
            publisher.publish("dup/1", b"one", qos=1)
            publisher.publish("dup/2", b"two", qos=2)
            one, two = parse_publish(*first.read_packet()), parse_publish(*first.read_packet())
            assert (one.payload, one.qos, one.dup) == (b"one", 1, False)
            assert (two.payload, two.qos, two.dup) == (b"two", 2, False)
            first.send(ack_packet(PUBREC, two.packet_id))  # QoS 2 half way: PUBREL comes, PUBCOMP is never sent
            assert first.read_packet() == (PUBREL, two.packet_id.to_bytes(2, "big"))
        with RawClient(broker.port) as second:  # the first closed without PUBACK for one and PUBCOMP for two
            assert second.connect("forgetful", clean=False) is True
            again = parse_publish(*second.read_packet())
            assert (again.payload, again.packet_id, again.dup) == (b"one", one.packet_id, True)
            assert second.read_packet() == (PUBREL, two.packet_id.to_bytes(2, "big"))
            second.send(ack_packet(PUBACK, one.packet_id) + ack_packet(PUBCOMP, two.packet_id))
            publisher.publish("dup/1", MARKER, qos=1)
            marker = parse_publish(*second.read_packet())
            assert (marker.payload, marker.dup) == (MARKER, False)


def test_an_offline_session_keeps_its_newest_messages_up_to_the_limit(
    start_broker: Callable[..., BrokerThread], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=BROKER_LOGGER)
    broker = start_broker(BrokerLimits(max_queued_messages=3))
    with PahoClient(broker.port, "publisher") as publisher:
        with RawClient(broker.port) as away:
            away.connect("bounded", clean=False)
            away.subscribe(1, ("bound/t", 1))
            away.send(DISCONNECT)
            away.wait_closed_by_broker()  # the session is offline now: what follows is queued
        for i in range(5):
            publisher.publish("bound/t", f"m{i}".encode(), qos=1)
        with PahoClient(broker.port, "bounded", clean_session=False) as back:
            assert back.session_present
            assert [back.next_message().payload for _ in range(3)] == [b"m2", b"m3", b"m4"]
            publisher.publish("bound/t", MARKER, qos=1)
            assert back.next_message().payload == MARKER
    assert any("dropping the oldest" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("connect", "return_code"),
    [
        (connect_packet("v31", level=3, name="MQIsdp"), 1),
        (connect_packet("v31", level=3), 1),
        (connect_packet("v5", level=5), 1),
        (connect_packet("", clean=False), 2),
    ],
    ids=["MQTT 3.1", "level 3", "MQTT 5", "empty id, persistent"],
)
def test_a_refused_connect_gets_its_return_code_and_the_connection_closes(
    broker: BrokerThread, connect: bytes, return_code: int
) -> None:
    with RawClient(broker.port) as raw:
        raw.send(connect)
        assert raw.read_packet() == (0x20, bytes((0, return_code)))
        raw.wait_closed_by_broker()


def test_clients_with_an_empty_id_and_clean_session_each_get_one_of_their_own(broker: BrokerThread) -> None:
    with RawClient(broker.port) as a, RawClient(broker.port) as b:
        assert a.connect("") is False
        assert b.connect("") is False  # not a takeover of a
        assert a.subscribe(1, ("anon/t", 0)) == b"\x00"
        b.send(publish_packet("anon/t", b"hello"))
        assert parse_publish(*a.read_packet()).payload == b"hello"


HOSTILE = {
    "reserved packet type": (False, b"\x00\x00"),
    "PINGREQ before CONNECT": (False, b"\xc0\x00"),
    "PUBLISH before CONNECT": (False, publish_packet("a", b"x")),
    "reserved CONNECT flag": (False, _packet(0x10, _string("MQTT") + bytes((4, 0x03)) + b"\x00\x00" + _string("x"))),
    "remaining length over four bytes": (True, b"\x30\xff\xff\xff\xff\x01"),
    "packet over the size limit": (True, b"\x30" + _varint(16 * 1024 * 1024)),  # its body is never sent
    "field longer than its packet": (True, b"\x30\x05\x00\x64abc"),
    "invalid UTF-8 topic": (True, publish_packet(b"a/\xff\xfe", b"x")),
    "U+0000 in a topic": (True, publish_packet("a/\x00", b"x")),
    "+ in a PUBLISH topic": (True, publish_packet("a/+/b", b"x")),
    "# in a PUBLISH topic": (True, publish_packet("a/#", b"x")),
    "QoS 3": (True, b"\x36" + publish_packet("a", b"x", qos=1, packet_id=1)[1:]),
    "packet id 0": (True, publish_packet("a", b"x", qos=1, packet_id=0)),
    "second CONNECT": (True, connect_packet("again")),
    "SUBSCRIBE with wrong flags": (True, _packet(0x80, b"\x00\x01" + _string("a") + b"\x00")),
    "SUBSCRIBE for QoS 3": (True, subscribe_packet(1, ("a", 3))),
    "CONNACK from a client": (True, b"\x20\x02\x00\x00"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_input_closes_that_connection_only_with_one_log_line(
    broker: BrokerThread, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    caplog.set_level(logging.DEBUG, logger=BROKER_LOGGER)
    connect_first, data = HOSTILE[case]
    with PahoClient(broker.port, "bystander") as bystander:
        assert bystander.subscribe("by/t", 1) == [1]
        with RawClient(broker.port) as raw:
            if connect_first:
                raw.connect("hostile")
            raw.send(data)
            raw.wait_closed_by_broker()
        bystander.publish("by/t", b"still served", qos=1)
        assert bystander.next_message().payload == b"still served"
        assert not bystander.dropped.is_set()
    warned = [r.getMessage() for r in caplog.records if r.name == BROKER_LOGGER and r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "hostile" in warned[0] if connect_first else len(warned) == 1, warned
    assert not [r for r in caplog.records if r.exc_info]


def test_a_connection_that_sends_no_connect_is_closed_at_the_deadline(
    start_broker: Callable[..., BrokerThread], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=BROKER_LOGGER)
    broker = start_broker(BrokerLimits(connect_timeout=0.2))
    with RawClient(broker.port) as idle:
        idle.wait_closed_by_broker()
    assert any("no CONNECT within 0.2 s" in r.getMessage() for r in caplog.records)


def test_a_client_that_cannot_keep_up_is_disconnected_while_the_others_are_served(
    start_broker: Callable[..., BrokerThread], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=BROKER_LOGGER)
    broker = start_broker(BrokerLimits(max_outgoing_bytes=256 * 1024))
    chunk = bytes(64 * 1024)
    with PahoClient(broker.port, "watcher") as watcher, PahoClient(broker.port, "feeder") as feeder:
        watcher.subscribe("slow/will", 0)
        feeder.subscribe("slow/feed", 0)
        with RawClient(broker.port, receive_buffer=4096) as sluggard:
            sluggard.connect("sluggard", will=("slow/will", b"too slow", 0, False))
            sluggard.subscribe(1, ("slow/feed", 0))
            sent = 0  # from here on the sluggard reads nothing: its bytes pile up in the broker until the limit
            while watcher.messages.empty() and sent < 2000:
                feeder.publish("slow/feed", chunk)
                sent += 1
            assert watcher.next_message().payload == b"too slow"
        feeder.publish("slow/feed", MARKER)
        received = 0
        while feeder.next_message().payload != MARKER:
            received += 1
    assert received == sent  # the feeder, subscribed to the same topic, got every message
    assert any("too slow" in r.getMessage() for r in caplog.records)


def test_stop_closes_every_connection_and_leaves_no_socket_or_task_behind() -> None:
    async def closed_by_broker(reader: asyncio.StreamReader) -> bool:
        try:
            return await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        except ConnectionResetError:
            return True

    async def scenario() -> None:
        broker = EmbeddedBroker(f"127.0.0.1:{free_port()}")
        await broker.start()
        async with aio(broker.port, "keeper", clean_session=False) as keeper:
            await keeper.subscribe("stop/t", qos=1)  # then away, its session kept
        silent = await asyncio.open_connection(broker.host, broker.port)  # never sends CONNECT
        raw = await asyncio.open_connection(broker.host, broker.port)
        raw[1].write(connect_packet("raw", keepalive=60))
        assert await asyncio.wait_for(raw[0].readexactly(4), TIMEOUT) == b"\x20\x02\x00\x00"
        async with aio(broker.port, "subscriber") as subscriber:
            await subscriber.subscribe("stop/#", qos=1)
            await subscriber.publish("stop/t", b"queued for keeper", qos=1, retain=True)
            assert seen(await next_message(subscriber))[1] == b"queued for keeper"
            await broker.stop()
            with pytest.raises(aiomqtt.MqttError):
                await next_message(subscriber)
        for reader, writer in (silent, raw):
            assert await closed_by_broker(reader)
            writer.close()
            await writer.wait_closed()
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

    with warnings.catch_warnings():  # sockets earlier tests in this process left to the collector are theirs
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(scenario())
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
