"""A release reaches real agent processes over MQTT + gRPC, through a real coordinator process, on both the
embedded broker and Mosquitto; upgrades, fleet rollback, and hostile input on both transports."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import paho.mqtt.client as paho
import pytest

from edge_agent.contract import Topics
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2_grpc as pb_grpc
from edge_agent.runtime import load_model
from server.datadir import DataDir
from server.trust.releases import publish_release
from tests.support import AgentProcess, CoordinatorProcess, Mosquitto, enroll_agent, wait_for


def fedfleet(d: DataDir, *args: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", *args, "--data-dir", str(d.root), "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def device(d: DataDir, device_id: str) -> dict[str, Any]:
    rows: list[dict[str, Any]] = fedfleet(d, "devices", "list")
    return next((r for r in rows if r["id"] == device_id), {})


@pytest.fixture(params=["embedded", pytest.param("mosquitto", marks=pytest.mark.broker)])
def fleet(
    request: pytest.FixtureRequest, datadir: DataDir, model_bytes: dict[str, bytes], tmp_path: Path
) -> Iterator[tuple[CoordinatorProcess, list[AgentProcess]]]:
    store = datadir.store()
    for version, data in model_bytes.items():
        publish_release(datadir.repository(), store, data, "digits", version)
    store.close()
    broker_url = request.getfixturevalue("mosquitto").url if request.param == "mosquitto" else None
    coordinator = CoordinatorProcess(datadir, broker_url).start()
    agents = [enroll_agent(datadir, tmp_path / "devices", f"pi-{i}", coordinator=coordinator).start() for i in (1, 2)]
    yield coordinator, agents
    for a in agents:
        a.kill()
    coordinator.kill()


def running(d: DataDir, device_id: str, release: str) -> bool:
    row = device(d, device_id)
    return row.get("running_release") == release and row.get("last_event") == "committed"


@pytest.mark.slow
def test_release_reaches_agents_and_fleet_rollback(
    fleet: tuple[CoordinatorProcess, list[AgentProcess]], datadir: DataDir
) -> None:
    _, agents = fleet
    wait_for(lambda: all(device(datadir, a.config.device_id).get("online") for a in agents), 30, what="online")

    fedfleet(datadir, "assign", "--fleet", "lab", "digits@1.0.0")
    for a in agents:
        wait_for(lambda a=a: running(datadir, a.config.device_id, "digits@1.0.0"), 30, what="1.0.0 committed")
    fedfleet(datadir, "assign", "--fleet", "lab", "digits@2.0.0")
    for a in agents:
        wait_for(lambda a=a: running(datadir, a.config.device_id, "digits@2.0.0"), 30, what="2.0.0 committed")
    rollback = fedfleet(datadir, "assign", "--fleet", "lab", "digits@1.0.0")
    assert {x["counter"] for x in rollback["assignments"]} == {3}
    for a in agents:
        wait_for(lambda a=a: running(datadir, a.config.device_id, "digits@1.0.0"), 30, what="rollback committed")

    status = agents[0].status()
    assert status["release"] == "digits@1.0.0" and status["committed_counter"] == 3 and not status["last_error"]
    # The agent runs it: the committed slot loads in the interpreter and gives a probability vector.
    active = agents[0].config.state_dir / "slots" / status["active_slot"] / "model.tflite"
    y = load_model(active).predict(np.full((1, 64), 0.5, dtype=np.float32))
    assert y.shape == (1, 10) and abs(float(y.sum()) - 1.0) < 1e-5
    shown = json.loads(
        subprocess.run(
            [sys.executable, "-m", "server.cli", "devices", "show", "pi-1", "--data-dir", str(datadir.root), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    kinds = [(e["kind"], e["counter"]) for e in reversed(shown["events"])]
    assert ("committed", 1) in kinds and ("committed", 2) in kinds and ("committed", 3) in kinds
    assert shown["hardware"]["interpreter"].startswith(("ai-edge-litert", "tflite-runtime"))

    agents[1].kill()  # its last will marks it offline
    wait_for(lambda: device(datadir, "pi-2").get("online") is False, 30, what="pi-2 offline")
    assert device(datadir, "pi-2")["running_release"] == "digits@1.0.0"  # the stale will did not overwrite it


def _publish(url: str, messages: list[tuple[str, bytes]]) -> None:
    host, port = url.removeprefix("mqtt://").split(":")
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="hostile")
    client.connect(host, int(port))
    client.loop_start()
    for topic, payload in messages:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()


@pytest.mark.slow
@pytest.mark.broker
def test_malformed_mqtt_payloads_change_nothing(datadir: DataDir, mosquitto: Mosquitto, tmp_path: Path) -> None:
    coordinator = CoordinatorProcess(datadir, mosquitto.url).start()
    agent = enroll_agent(datadir, tmp_path, "pi-9", coordinator=coordinator).start()
    try:
        wait_for(lambda: device(datadir, "pi-9").get("online"), 30, what="pi-9 online")
        before = device(datadir, "pi-9")
        t = Topics(datadir.config().topic_prefix)  # this test's own prefix: nothing else arrives on it
        forged_status = pb.DeviceStatus(device_id="pi-other", online=True, running_release="evil@1").SerializeToString()
        forged_event = pb.UpdateEvent(device_id="pi-other", kind=pb.EVENT_KIND_COMMITTED).SerializeToString()
        unknown = pb.UpdateEvent(device_id="ghost", kind=pb.EVENT_KIND_COMMITTED).SerializeToString()
        # The control, sent last on the same connection: a valid event, stored only after the coordinator has
        # handled every message before it (and proof that the handler accepts what is valid).
        control = pb.UpdateEvent(device_id="pi-9", kind=pb.EVENT_KIND_DOWNLOADING, reason="control")
        log_start = coordinator.log.stat().st_size
        _publish(
            mosquitto.url,
            [
                (t.status("pi-9"), b"\xff\xff not protobuf"),
                (t.status("pi-9"), forged_status),  # another device's id on pi-9's topic
                (t.events("pi-9"), forged_event),
                (t.events("ghost"), unknown),  # never registered
                (t.events("pi-9"), pb.UpdateEvent(device_id="pi-9", kind=99).SerializeToString()),
                (t.events("pi-9"), b"x" * 100_000),  # absurd size
                (t.events("pi-9"), control.SerializeToString()),
            ],
        )
        store = datadir.store()
        try:
            events = wait_for(store.events, 20, what="the control event stored")
            assert [(e["device_id"], e["kind"], e["reason"]) for e in events] == [("pi-9", "downloading", "control")]
            assert not store.is_device("ghost") and not store.is_device("pi-other")
        finally:
            store.close()
        log = coordinator.log.read_bytes()[log_start:].decode()
        assert log.count("rejected message") == 6, log
        assert "names device 'pi-other' but was sent on 'pi-9'" in log and "has not registered" in log
        after = device(datadir, "pi-9")
        unchanged = {k: v for k, v in after.items() if k not in ("last_seen", "last_event")}
        assert unchanged == {k: v for k, v in before.items() if k not in ("last_seen", "last_event")}
        assert after["last_event"] == "downloading: control"  # the control's
    finally:
        agent.kill()
        coordinator.kill()


@pytest.mark.broker
def test_malformed_grpc_requests_get_clear_errors(datadir: DataDir, mosquitto: Mosquitto) -> None:
    coordinator = CoordinatorProcess(datadir, mosquitto.url).start()
    channel = grpc.insecure_channel(coordinator.endpoints["grpc"])
    stub = pb_grpc.FleetServiceStub(channel)
    try:

        def code(call: Any) -> tuple[grpc.StatusCode, str]:
            with pytest.raises(grpc.RpcError) as info:
                result = call()
                if not isinstance(result, pb.RegisterResponse | pb.ReportEventsResponse):
                    list(result)
            return info.value.code(), info.value.details()

        assert (
            code(lambda: stub.Register(pb.RegisterRequest(device_id="../etc", fleet="lab")))[0]
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        assert (
            code(lambda: stub.Register(pb.RegisterRequest(device_id="ok", fleet="")))[0]
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        big = pb.RegisterRequest(device_id="ok", fleet="lab", labels={f"k{i}": "v" * 200 for i in range(500)})
        assert code(lambda: stub.Register(big))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        for path in ("../keys/root.pem", "/etc/passwd", "root.json.bak", "99.root.json"):
            assert (
                code(lambda path=path: stub.FetchMetadata(pb.FetchRequest(path=path)))[0] == grpc.StatusCode.NOT_FOUND
            )
        assert (
            code(lambda: stub.FetchTarget(pb.FetchRequest(path="../../keys/director.pem")))[0]
            == grpc.StatusCode.NOT_FOUND
        )
        assert (
            code(lambda: stub.FetchMetadata(pb.FetchRequest(path="1.root.json", offset=10**9)))[0]
            == grpc.StatusCode.OUT_OF_RANGE
        )
        status, details = code(
            lambda: stub.ReportEvents(
                pb.ReportEventsRequest(events=[pb.UpdateEvent(device_id="ghost", kind=pb.EVENT_KIND_COMMITTED)])
            )
        )
        assert status == grpc.StatusCode.INVALID_ARGUMENT and "has not registered" in details
        # A resumed read from an offset returns exactly the rest of the file.
        whole = b"".join(c.data for c in stub.FetchMetadata(pb.FetchRequest(path="1.root.json")))
        rest = b"".join(c.data for c in stub.FetchMetadata(pb.FetchRequest(path="1.root.json", offset=100)))
        assert rest == whole[100:] and whole == (datadir.repository_dir / "metadata" / "1.root.json").read_bytes()
        store = datadir.store()
        assert store.devices() == [] and store.events() == []
        store.close()
    finally:
        channel.close()
        coordinator.kill()
