"""The coordinator's own MQTT client (server/ingest/mqtt_client.py): against Mosquitto and the embedded broker for
what it does with a real broker, and against a scripted peer on loopback for what a real broker never does
(a refused CONNACK, a silent or lying server) and for exactly when PUBACKs leave."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import aiomqtt
import pytest

from edge_agent.contract import Topics
from server.datadir import DataDir
from server.ingest.broker import EmbeddedBroker, free_port
from server.ingest.mqtt_bridge import MqttBridge
from server.ingest.mqtt_client import MqttClient, MqttClientError
from server.ingest.mqtt_codec import (
    ConnAck,
    ConnectReturnCode,
    Message,
    PacketReader,
    PacketType,
    Publish,
    decode_packet,
    decode_server_packet,
    encode_acknowledgement,
    encode_connack,
    encode_publish_header,
    encode_suback,
)
from simulations.processes import Mosquitto

TIMEOUT = 10.0


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


async def _round_trip(host: str, port: int, prefix: str) -> None:
    """Subscribe, receive what another client publishes (in order, QoS 0 and 1), publish retained at QoS 1 with a
    small in-flight window, and see a new subscriber get every retained message."""
    got: list[list[Message]] = []
    arrived = asyncio.Event()

    def on_messages(messages: list[Message]) -> None:
        got.append(messages)
        if sum(len(m) for m in got) >= 20:
            arrived.set()

    client = await MqttClient.connect(host, port, client_id=f"{prefix}-coordinator", on_messages=on_messages)
    try:
        await client.subscribe([(f"{prefix}/in/+", 1)])
        async with aiomqtt.Client(host, port, identifier=f"{prefix}-device") as device:
            for i in range(20):
                await device.publish(f"{prefix}/in/{i % 3}", str(i).encode(), qos=i % 2)
        await asyncio.wait_for(arrived.wait(), TIMEOUT)
        received = [m for batch in got for m in batch]
        assert [(m.topic, m.payload, m.qos) for m in received] == [
            (f"{prefix}/in/{i % 3}", str(i).encode(), i % 2) for i in range(20)
        ]

        client._max_inflight = 2  # more publishes than the window: the rest queue and follow in order
        await asyncio.wait_for(
            asyncio.gather(*(client.publish(f"{prefix}/out/{i}", b"v%d" % i, 1, retain=True) for i in range(50))),
            TIMEOUT,
        )
        assert client._inflight == {} and not client._queued
        async with aiomqtt.Client(host, port, identifier=f"{prefix}-reader") as reader:
            await reader.subscribe(f"{prefix}/out/+", qos=1)
            retained: dict[str, bytes] = {}
            async with asyncio.timeout(TIMEOUT):
                async for message in reader.messages:
                    retained[message.topic.value] = bytes(message.payload)  # type: ignore[arg-type]
                    if len(retained) == 50:
                        break
        assert retained == {f"{prefix}/out/{i}": b"v%d" % i for i in range(50)}
    finally:
        client.close()
        reason = await asyncio.wait_for(client.closed, TIMEOUT)
    assert isinstance(reason, MqttClientError)


@pytest.mark.broker
def test_a_round_trip_through_mosquitto(mosquitto: Mosquitto) -> None:
    _run(lambda: _round_trip("127.0.0.1", mosquitto.port, "client-mosquitto"))


def test_a_round_trip_through_the_embedded_broker() -> None:
    async def scenario() -> None:
        broker = EmbeddedBroker(f"127.0.0.1:{free_port()}")
        await broker.start()
        try:
            await _round_trip(broker.host, broker.port, "client-embedded")
        finally:
            await broker.stop()

    _run(scenario)


@pytest.mark.broker
def test_a_lost_connection_fails_every_waiting_publish(private_mosquitto: Mosquitto) -> None:
    async def scenario() -> None:
        client = await MqttClient.connect(
            "127.0.0.1", private_mosquitto.port, client_id="lost", on_messages=lambda m: None
        )
        private_mosquitto.stop()
        reason = await asyncio.wait_for(client.closed, TIMEOUT)
        assert "connection" in str(reason)
        with pytest.raises(MqttClientError):
            await client.publish("a/b", b"x", 1)
        with pytest.raises(MqttClientError):
            await client.subscribe([("a/#", 1)])

    _run(scenario)


def test_no_broker_at_the_address_is_a_clear_error() -> None:
    async def scenario() -> None:
        port = free_port()
        with pytest.raises(MqttClientError, match=f"MQTT broker 127.0.0.1:{port}"):
            await MqttClient.connect("127.0.0.1", port, client_id="nobody", on_messages=lambda m: None)

    _run(scenario)


def test_bad_arguments_are_refused_before_anything_is_sent() -> None:
    async def scenario() -> None:
        with pytest.raises(ValueError, match="max_inflight"):
            await MqttClient.connect("127.0.0.1", 1, client_id="x", on_messages=lambda m: None, max_inflight=0)

    _run(scenario)


# --- against a scripted peer ---------------------------------------------------------------------------------------


class _Peer:
    """A loopback server that reads what the client sends (decoded as a broker would) and writes what a test says."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[object] = asyncio.Queue()
        self.writer: asyncio.StreamWriter | None = None
        self.connected = asyncio.Event()
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.connected.set()
        packets = PacketReader(1 << 20, decode_packet)
        while data := await reader.read(65536):
            packets.feed(data)
            while (packet := packets.next_packet()) is not None:
                self.received.put_nowait(packet)
        self.received.put_nowait("closed")

    async def next(self) -> object:
        return await asyncio.wait_for(self.received.get(), TIMEOUT)

    def send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)


@contextlib.asynccontextmanager
async def _peer() -> AsyncIterator[_Peer]:
    peer = _Peer()
    server = await asyncio.start_server(peer._serve, "127.0.0.1", 0)
    peer.port = server.sockets[0].getsockname()[1]
    try:
        yield peer
    finally:
        if peer.writer is not None:
            peer.writer.close()
        server.close()


async def _connected(peer: _Peer, on_messages: Callable[[list[Message]], object], **kw: object) -> MqttClient:
    connecting = asyncio.create_task(
        MqttClient.connect("127.0.0.1", peer.port, client_id="scripted", on_messages=on_messages, **kw)  # type: ignore[arg-type]
    )
    await asyncio.wait_for(peer.connected.wait(), TIMEOUT)
    assert type(await peer.next()).__name__ == "Connect"
    peer.send(encode_connack(False, ConnectReturnCode.ACCEPTED))
    return await connecting


def _publish(topic: str, payload: bytes, packet_id: int) -> bytes:
    return encode_publish_header(topic, len(payload), 1, False, packet_id) + payload


def _puback(packet_id: int) -> object:
    """A PUBACK as the scripted peer decodes it."""
    reader = PacketReader(16, decode_packet)
    reader.feed(encode_acknowledgement(PacketType.PUBACK, packet_id))
    return reader.next_packet()


def test_pubacks_leave_after_the_handler_returned_and_never_when_it_failed() -> None:
    async def scenario() -> None:
        async with _peer() as peer:
            handled: list[str] = []

            def on_messages(messages: list[Message]) -> None:
                if any(m.payload == b"poison" for m in messages):
                    raise RuntimeError("the store failed")
                handled.extend(m.topic for m in messages)

            client = await _connected(peer, on_messages)
            # Two messages in one write: one list, then both PUBACKs in order
            peer.send(_publish("d/1", b"a", 7) + _publish("d/2", b"b", 8))
            assert await peer.next() == _puback(7)
            assert await peer.next() == _puback(8)
            assert handled == ["d/1", "d/2"]
            # A handler that raises: no PUBACK, the connection closes
            peer.send(_publish("d/3", b"poison", 9))
            assert await peer.next() == "closed"
            assert "handler failed" in str(await asyncio.wait_for(client.closed, TIMEOUT))
            assert handled == ["d/1", "d/2"]

    _run(scenario)


@pytest.mark.parametrize(
    ("return_code", "says"), [(5, "not authorised (5)"), (4, "bad user name or password"), (42, "unknown")]
)
def test_a_refused_connection_says_why(return_code: int, says: str) -> None:
    async def scenario() -> None:
        async with _peer() as peer:
            connecting = asyncio.create_task(
                MqttClient.connect("127.0.0.1", peer.port, client_id="refused", on_messages=lambda m: None)
            )
            await asyncio.wait_for(peer.connected.wait(), TIMEOUT)
            await peer.next()
            peer.send(bytes((PacketType.CONNACK << 4, 2, 0, return_code)))
            with pytest.raises(MqttClientError, match=re.escape(f"refused the connection: {says}")):
                await connecting

    _run(scenario)


def test_a_server_that_never_answers_connect_times_out() -> None:
    async def scenario() -> None:
        async with _peer() as peer:
            with pytest.raises(MqttClientError, match=re.escape("no connection within 0.5 s")):
                await MqttClient.connect(
                    "127.0.0.1", peer.port, client_id="silent", on_messages=lambda m: None, timeout=0.5
                )
            assert await peer.next() is not None  # its CONNECT; then the client hung up
            assert await peer.next() == "closed"

    _run(scenario)


@pytest.mark.parametrize(
    ("packet", "says"),
    [
        (encode_acknowledgement(PacketType.PUBACK, 99), "PUBACK for packet id 99"),
        (encode_connack(False, ConnectReturnCode.ACCEPTED), "a second CONNACK"),
        (bytes((PacketType.PINGREQ << 4, 0)), "only a client sends"),
        (encode_publish_header("d/x", 1, 2, False, 3) + b"q", "QoS 2"),
        (bytes((0xF0, 0)), "packet type 15"),
        (encode_suback(4, [1]), "SUBACK for packet id 4"),
    ],
)
def test_a_server_that_breaks_the_protocol_is_disconnected(packet: bytes, says: str) -> None:
    async def scenario() -> None:
        async with _peer() as peer:
            client = await _connected(peer, lambda m: None)
            publishing = client.publish("d/out", b"x", 1)
            await peer.next()  # the PUBLISH, never acknowledged
            peer.send(packet)
            reason = await asyncio.wait_for(client.closed, TIMEOUT)
            assert "broke the protocol" in str(reason) and says in str(reason)
            with pytest.raises(MqttClientError):
                await publishing
            assert await peer.next() == "closed"

    _run(scenario)


def test_a_broker_that_goes_silent_is_left_after_one_and_a_half_keepalives() -> None:
    async def scenario() -> None:
        async with _peer() as peer:
            client = await _connected(peer, lambda m: None, keepalive=1)
            assert type(await peer.next()).__name__ == "Signal"  # a PINGREQ after half a keepalive, unanswered
            reason = await asyncio.wait_for(client.closed, TIMEOUT)
            assert "sent nothing for 1.5 s" in str(reason)

    _run(scenario)


def test_connack_and_publish_decode_as_a_client_reads_them() -> None:
    reader = PacketReader(1 << 10, decode_server_packet)
    reader.feed(encode_connack(True, ConnectReturnCode.ACCEPTED) + _publish("a/b", b"payload", 5))
    assert reader.next_packet() == ConnAck(True, 0)
    publish = reader.next_packet()
    assert isinstance(publish, Publish) and publish.packet_id == 5 and publish.message == Message("a/b", b"payload", 1)
    assert reader.next_packet() is None


def test_the_bridge_keeps_what_a_lost_connection_did_not_publish(datadir: DataDir) -> None:
    """Telemetry acks whose PUBACKs never came stay pending for the next tick, without a traceback."""

    async def scenario() -> None:
        bridge = MqttBridge(datadir.store(), "mqtt://127.0.0.1:1", Topics("lost"))
        async with _peer() as peer:
            bridge._client = await _connected(peer, bridge.receive)
            bridge.connected.set()
            bridge._pending_acks = {"pi-1": 3, "pi-2": 5}
            publishing = asyncio.create_task(bridge.publish_acks())
            assert isinstance(await peer.next(), Publish)
            bridge._pending_acks["pi-1"] = 4  # a newer watermark stored meanwhile
            assert peer.writer is not None
            peer.writer.transport.abort()  # the broker goes away before any PUBACK
            assert await asyncio.wait_for(publishing, TIMEOUT) == 0
            assert bridge._pending_acks == {"pi-1": 4, "pi-2": 5}
        async with _peer() as peer:  # the next session publishes them
            bridge._client = await _connected(peer, bridge.receive)
            publishing = asyncio.create_task(bridge.publish_acks())
            for _ in range(2):
                packet = await peer.next()
                assert isinstance(packet, Publish) and packet.message.retain
                peer.send(encode_acknowledgement(PacketType.PUBACK, packet.packet_id))
            assert await asyncio.wait_for(publishing, TIMEOUT) == 2
            assert bridge._pending_acks == {}

    _run(scenario)
