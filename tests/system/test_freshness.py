"""Fresh assignments (issue 24), on real parts: a coordinator process on a real Mosquitto, a real agent process,
and a network attacker between them on loopback (a gRPC man-in-the-middle that forwards every call, and can
strip the assignment and the freshness statement from Register and drop the freshness check), who also writes to
the device's retained desired topic and can drop the freshness statements the coordinator pushes on MQTT (a
relay on the device's MQTT connection).

- A superseded assignment replayed with a stripped Register: refused (the director's statement names a higher
  counter); with the statements withheld too, nothing is installed and the device reports itself stale within
  the freshness bound (status, event, dashboard API, /metrics, alert, `fedfleet devices behind`), and is fresh
  and current again once the attacker lets go.
- A flood of garbage on the retained desired topic: the update still arrives, through the periodic check.
- Controls: a normal assignment installs (every test starts with one, and the flood test ends with one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import paho.mqtt.client as paho
import pytest

from edge_agent.contract import Topics
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2_grpc as pb_grpc
from server.datadir import DataDir
from server.trust.enrollment import write_bundle
from server.trust.releases import publish_release
from tests.support import AgentProcess, CoordinatorProcess, Mosquitto, fedfleet, wait_for

DEVICE = "pi-f"
FRESHNESS_HOURS = 0.002  # 7.2 s: statements expire fast, so staleness shows within the test
BOUND_SECONDS = FRESHNESS_HOURS * 3600

Context = grpc.aio.ServicerContext[Any, Any]


class Attacker(pb_grpc.FleetServiceServicer):
    """Forwards every FleetService call to the coordinator (errors with their codes), unless told to tamper."""

    def __init__(self, upstream: str) -> None:
        self.stub = pb_grpc.FleetServiceStub(grpc.aio.insecure_channel(upstream))
        self.strip_assignment = False
        self.strip_freshness = False
        self.drop_checks = False
        self.stripped = 0  # Register responses whose assignment was removed
        self.checks_dropped = 0
        self.checks_with_assignment = 0  # Check answers that carried an assignment to the device

    async def Register(self, request: pb.RegisterRequest, context: Context) -> pb.RegisterResponse:
        response: pb.RegisterResponse = await self._call(self.stub.Register(request), context)
        if self.strip_assignment and response.HasField("assignment"):
            response.ClearField("assignment")
            self.stripped += 1
        if self.strip_freshness:
            response.ClearField("freshness")
        return response

    async def Check(self, request: pb.CheckRequest, context: Context) -> pb.CheckResponse:
        if self.drop_checks:
            self.checks_dropped += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "dropped on the way")
        response: pb.CheckResponse = await self._call(self.stub.Check(request), context)
        self.checks_with_assignment += response.HasField("assignment")
        return response

    async def ReportEvents(self, request: pb.ReportEventsRequest, context: Context) -> pb.ReportEventsResponse:
        response: pb.ReportEventsResponse = await self._call(self.stub.ReportEvents(request), context)
        return response

    async def UploadTelemetry(
        self, request_iterator: AsyncIterator[pb.TelemetryWindow], context: Context
    ) -> pb.TelemetryAck:
        response: pb.TelemetryAck = await self._call(self.stub.UploadTelemetry(request_iterator), context)
        return response

    async def FetchMetadata(self, request: pb.FetchRequest, context: Context) -> AsyncIterator[pb.Chunk]:
        async for m in self._stream(self.stub.FetchMetadata(request), context):
            yield m

    async def FetchTarget(self, request: pb.FetchRequest, context: Context) -> AsyncIterator[pb.Chunk]:
        async for m in self._stream(self.stub.FetchTarget(request), context):
            yield m

    async def FetchMetadataBundle(
        self, request: pb.MetadataBundleRequest, context: Context
    ) -> AsyncIterator[pb.MetadataPart]:
        async for m in self._stream(self.stub.FetchMetadataBundle(request), context):
            yield m

    @staticmethod
    async def _call(call: Any, context: Context) -> Any:
        try:
            return await call
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), e.details() or "")

    @staticmethod
    async def _stream(call: Any, context: Context) -> AsyncIterator[Any]:
        try:
            async for m in call:
                yield m
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), e.details() or "")


class AttackerThread:
    """The attacker's gRPC server on a free loopback port, served from a thread with its own event loop."""

    def __init__(self, upstream: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> tuple[Attacker, grpc.aio.Server, int]:
            attacker = Attacker(upstream)
            server = grpc.aio.server()
            pb_grpc.add_FleetServiceServicer_to_server(attacker, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return attacker, server, port

        self.attacker, self.server, self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class MqttRelay:
    """The attacker on the device's MQTT path: a TCP relay to the broker that passes everything, except (when
    told) the broker's PUBLISH packets on topics ending in `/freshness`, which it drops (acknowledging QoS 1 ones
    to the broker, so nothing piles up in flight). Runs in a thread with its own event loop."""

    def __init__(self, broker_port: int) -> None:
        self.broker_port = broker_port
        self.drop_freshness = False
        self.dropped = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> asyncio.Server:
            return await asyncio.start_server(self._client, "127.0.0.1", 0)

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.port: int = self.server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def _client(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        broker_r, broker_w = await asyncio.open_connection("127.0.0.1", self.broker_port)

        async def upstream() -> None:
            while data := await client_r.read(65536):
                broker_w.write(data)
                await broker_w.drain()

        async def downstream() -> None:
            while True:
                first = await broker_r.readexactly(1)
                length, multiplier, header = 0, 1, bytearray(first)
                for _ in range(4):  # MQTT's remaining length: at most four bytes of seven bits
                    byte = (await broker_r.readexactly(1))[0]
                    header.append(byte)
                    length += (byte & 0x7F) * multiplier
                    multiplier *= 128
                    if not byte & 0x80:
                        break
                body = await broker_r.readexactly(length)
                if self.drop_freshness and first[0] >> 4 == 3:  # PUBLISH
                    topic_length = int.from_bytes(body[:2], "big")
                    if body[2 : 2 + topic_length].endswith(b"/freshness"):
                        self.dropped += 1
                        if (first[0] >> 1) & 0x03:  # QoS 1: acknowledge it to the broker ourselves
                            packet_id = body[2 + topic_length : 4 + topic_length]
                            broker_w.write(bytes([0x40, 0x02]) + packet_id)
                            await broker_w.drain()
                        continue
                client_w.write(bytes(header) + body)
                await client_w.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in (client_w, broker_w):
                w.close()
            for w in (client_w, broker_w):  # closed for real before the loop may stop (else: unclosed transports)
                with contextlib.suppress(Exception):
                    await w.wait_closed()

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            relaying = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in relaying:
                task.cancel()
            # each connection's handler closes both its sockets as it ends: wait for that, then for the server
            await asyncio.gather(*relaying, return_exceptions=True)
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Rig:
    d: DataDir
    coordinator: CoordinatorProcess
    proxy: AttackerThread
    relay: MqttRelay
    agent: AgentProcess
    topics: Topics
    broker: Mosquitto

    @property
    def attacker(self) -> Attacker:
        return self.proxy.attacker

    def device(self) -> dict[str, Any]:
        with self.d.store() as store:
            return store.device(DEVICE)

    def events(self) -> list[dict[str, Any]]:
        with self.d.store() as store:
            return store.events(DEVICE, limit=1000)

    def assign(self, release: str) -> int:
        out = fedfleet(self.d, "assign", DEVICE, release, "--json")
        assert out.returncode == 0, out.stderr
        counter: int = json.loads(out.stdout)["assignments"][0]["counter"]
        return counter

    def signed_assignment(self, counter: int) -> bytes:
        with self.d.store() as store:
            row = next(r for r in store.assignments(DEVICE) if r["counter"] == counter)
        signed: bytes = row["signed"]
        return signed

    def published(self, counter: int) -> bool:
        with self.d.store() as store:
            return any(r["counter"] == counter and r["published_at"] for r in store.assignments(DEVICE))

    def runs(self, release: str, counter: int) -> bool:
        row = self.device()
        return row["running_release"] == release and row["running_counter"] == counter

    def publish_desired(self, payloads: list[bytes]) -> None:
        """The attacker writes the device's retained desired state (the test broker takes anonymous clients)."""
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="attacker")
        client.connect("127.0.0.1", self.broker.port)
        client.loop_start()
        try:
            for payload in payloads:
                client.publish(self.topics.desired(DEVICE), payload, qos=1, retain=True).wait_for_publish(10)
        finally:
            client.loop_stop()
            client.disconnect()


@pytest.fixture
def rig(datadir: DataDir, mosquitto: Mosquitto, model_bytes: dict[str, bytes], tmp_path: Path) -> Iterator[Rig]:
    config = datadir.config_path.read_text()
    datadir.config_path.write_text(config.replace("freshness_hours = 24.0", f"freshness_hours = {FRESHNESS_HOURS}"))
    assert datadir.config().freshness_hours == FRESHNESS_HOURS
    with datadir.store() as store:
        for version, data in model_bytes.items():
            publish_release(datadir.repository(), store, data, "digits", version)
    coordinator = CoordinatorProcess(datadir, mosquitto.url).start()
    proxy = AttackerThread(coordinator.endpoints["grpc"])
    relay = MqttRelay(mosquitto.port)
    bundle = tmp_path / "devices" / DEVICE
    agent_config = write_bundle(
        datadir, DEVICE, bundle, "lab", {}, proxy.address, relay.url, extra={"retry_seconds": 0.3}
    )
    agent = AgentProcess(bundle / "agent.toml", agent_config).start()
    r = Rig(datadir, coordinator, proxy, relay, agent, Topics(datadir.config().topic_prefix), mosquitto)
    try:
        wait_for(lambda: r.device().get("online") if _registered(r) else False, 30, what="device online")
        # The control: a normal assignment installs, through the attacker's relay while it only forwards.
        assert r.assign("digits@1.0.0") == 1
        wait_for(lambda: r.runs("digits@1.0.0", 1), 60, what="1.0.0 committed")
        wait_for(lambda: r.device()["fresh_until"] > 0 and not r.device()["stale"], 30, what="a fresh statement")
        yield r
    finally:
        agent.kill()
        coordinator.kill()
        proxy.stop()
        relay.stop()


def _registered(r: Rig) -> bool:
    with r.d.store() as store:
        return store.is_device(DEVICE)


def _superseded_while_offline(r: Rig) -> bytes:
    """The device goes offline; the operator assigns 2.0.0 (counter 2), then rolls back to 1.0.0 (counter 3).
    Returns the recorded counter-2 message, which the attacker then republishes as the retained desired state."""
    r.agent.kill()
    assert r.assign("digits@2.0.0") == 2
    assert r.assign("digits@1.0.0") == 3
    wait_for(lambda: r.published(3), 30, what="counter 3 published")
    recorded = r.signed_assignment(2)
    r.publish_desired([recorded])
    return recorded


def _never_ran_counter_2(r: Rig) -> None:
    events = r.events()
    assert not [e for e in events if e["counter"] == 2 and e["kind"] in ("downloading", "installed", "committed")]
    state = r.agent.status()
    assert state["release"] == "digits@1.0.0", state


@pytest.mark.broker
@pytest.mark.slow
def test_a_superseded_assignment_replayed_with_a_stripped_register_is_refused(rig: Rig) -> None:
    _superseded_while_offline(rig)
    rig.attacker.strip_assignment = True

    rig.agent.start()

    def refused_counter_2() -> bool:
        return any(e["counter"] == 2 and e["kind"] == "rejected" for e in rig.events())

    wait_for(refused_counter_2, 60, what="the replayed counter-2 assignment refused")
    # The periodic check brings the real latest assignment (the rollback, counter 3) in place of the stripped one.
    wait_for(lambda: rig.runs("digits@1.0.0", 3), 60, what="counter 3 committed")
    assert rig.attacker.stripped >= 1  # Register did answer without the assignment
    refusal = next(e for e in rig.events() if e["counter"] == 2 and e["kind"] == "rejected")
    # Superseded (a statement for counter 3 was held) or a replay (counter 3 was accepted first): never installed.
    assert refusal["reason"] in ("assignment_superseded", "assignment_replay"), refusal
    _never_ran_counter_2(rig)
    assert rig.agent.status()["highest_counter"] == 3


def _metrics(r: Rig) -> str:
    request = urllib.request.Request(
        r.coordinator.endpoints["dashboard"] + "/metrics",
        headers={"Authorization": f"Bearer {r.d.operator_token()}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        text: str = response.read().decode()
    return text


def _alerts(r: Rig, state: str) -> list[dict[str, Any]]:
    out = fedfleet(r.d, "alerts", "list", "--state", state, "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    alerts: list[dict[str, Any]] = doc["alerts"] if isinstance(doc, dict) else doc
    return alerts


@pytest.mark.broker
@pytest.mark.slow
def test_with_the_statements_withheld_too_the_device_installs_nothing_and_reports_itself_stale(rig: Rig) -> None:
    _superseded_while_offline(rig)
    rig.attacker.strip_assignment = rig.attacker.strip_freshness = rig.attacker.drop_checks = True
    rig.relay.drop_freshness = True  # and the statements the coordinator pushes on MQTT

    rig.agent.start()

    # Detected within the freshness bound: the statement the device held expires at most BOUND_SECONDS after it
    # was issued, and the device says so at once (the wait allows for process start and MQTT delivery).
    wait_for(lambda: rig.device()["stale"], BOUND_SECONDS + 15, what="the device reports itself stale")
    stale_events = [e for e in rig.events() if e["kind"] == "stale"]
    assert stale_events and stale_events[0]["reason"] == "freshness_expired", stale_events
    assert rig.attacker.checks_dropped >= 1 and rig.relay.dropped >= 1
    _never_ran_counter_2(rig)
    status = rig.agent.status()
    assert status["highest_counter"] == 1  # counter 2 was never accepted: it could not be confirmed
    assert status["stale"] is True and status["stated_counter"] == 1  # `fedfleet-agent status` says it too
    # The coordinator shows it: the device view, `fedfleet devices behind`, /metrics, an alert.
    view = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(
                rig.coordinator.endpoints["dashboard"] + f"/api/devices/{DEVICE}",
                headers={"Authorization": f"Bearer {rig.d.operator_token()}"},
            ),
            timeout=10,
        ).read()
    )
    assert view["freshness"]["stale"] is True and view["freshness"]["director_counter"] == 3
    behind = fedfleet(rig.d, "devices", "behind", "--json")
    assert behind.returncode == 0, behind.stderr
    rows = json.loads(behind.stdout)
    assert [(r["device_id"], r["stale"], r["assigned_release"]) for r in rows] == [(DEVICE, True, "digits@1.0.0")]
    assert 'fedfleet_devices_stale{fleet="lab"} 1.0' in _metrics(rig)
    wait_for(
        lambda: any(a["kind"] == "devices_stale" and a["subject"] == "lab" for a in _alerts(rig, "open")),
        40,
        what="a devices_stale alert",
    )

    # The attacker lets go: the device gets a fresh statement and the real latest assignment, and says so.
    rig.attacker.strip_assignment = rig.attacker.strip_freshness = rig.attacker.drop_checks = False
    rig.relay.drop_freshness = False
    wait_for(lambda: rig.runs("digits@1.0.0", 3) and not rig.device()["stale"], 90, what="fresh and current")
    wait_for(  # the event may reach the coordinator after the status does
        lambda: next(e["kind"] for e in rig.events() if e["kind"] in ("stale", "fresh")) == "fresh",
        30,
        what="a fresh event after the stale one",
    )
    _never_ran_counter_2(rig)
    wait_for(lambda: not any(a["kind"] == "devices_stale" for a in _alerts(rig, "open")), 40, what="the alert resolved")


@pytest.mark.broker
@pytest.mark.slow
def test_a_flood_on_the_retained_desired_topic_does_not_hold_an_update_back(rig: Rig) -> None:
    stop = threading.Event()
    sent = [0]

    def flood() -> None:
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="flooder")
        client.connect("127.0.0.1", rig.broker.port)
        client.loop_start()
        try:
            for _ in range(100_000):  # bounded; stopped long before
                if stop.wait(0.01):
                    break
                client.publish(rig.topics.desired(DEVICE), os.urandom(64), qos=0, retain=True)
                sent[0] += 1
        finally:
            client.loop_stop()
            client.disconnect()

    flooder = threading.Thread(target=flood, daemon=True)
    # The device is offline while the assignment is issued and published; the flood overwrites it on the
    # retained topic, and Register no longer carries it: only the freshness check can bring it.
    rig.agent.kill()
    flooder.start()
    try:
        wait_for(lambda: sent[0] > 20, 10, what="the flood under way")
        rig.attacker.strip_assignment = True
        assert rig.assign("digits@2.0.0") == 2
        wait_for(lambda: rig.published(2), 30, what="counter 2 published")
        rig.agent.start()
        wait_for(lambda: rig.runs("digits@2.0.0", 2), 60, what="2.0.0 committed despite the flood")
        assert rig.attacker.checks_with_assignment >= 1
        assert sent[0] > 100
    finally:
        stop.set()
        flooder.join(10)

    # Control: with the attacker gone, a normal assignment arrives and installs as before.
    rig.attacker.strip_assignment = False
    assert rig.assign("digits@1.0.0") == 3
    wait_for(lambda: rig.runs("digits@1.0.0", 3), 60, what="1.0.0 committed")
