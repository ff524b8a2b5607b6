"""Plaintext only on loopback: `fedfleet serve` refuses to expose gRPC, the dashboard or an MQTT connection in
plaintext beyond this machine, says how to fix it, and binds nothing; with `--tls` it serves devices mutual TLS
and the dashboard HTTPS. No test here listens beyond loopback: the refusal happens before anything binds."""

from __future__ import annotations

import json
import logging
import ssl
import urllib.request
from pathlib import Path

import grpc
import pytest

from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2_grpc
from server.coordinator import Coordinator, ServeOptions
from server.datadir import DataDir
from server.errors import CoordinatorError
from server.exposure import ALLOW_FLAG, Listeners, plaintext_exposures
from tests.support import CoordinatorProcess, fedfleet


@pytest.fixture
def datadir(tmp_path: Path) -> DataDir:
    return DataDir.init(tmp_path / "data")[0]


LOOPBACK = Listeners("127.0.0.1:50051", False, "mqtt://127.0.0.1:1883", "127.0.0.1:8080", False)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7", "[::]", "coordinator.lan"])
def test_each_plaintext_channel_beyond_loopback_is_named_with_its_fix(host: str) -> None:
    assert plaintext_exposures(LOOPBACK) == []
    assert plaintext_exposures(Listeners("[::1]:1", False, "mqtt://localhost:1", "localhost:2", False)) == []
    grpc_open = Listeners(f"{host}:50051", False, "", "", False)
    (sentence,) = plaintext_exposures(grpc_open)
    assert sentence.startswith("gRPC for devices") and "--tls" in sentence
    assert plaintext_exposures(Listeners(f"{host}:50051", True, "", "", False)) == []
    (sentence,) = plaintext_exposures(Listeners("127.0.0.1:1", False, "", f"{host}:8080", False))
    assert sentence.startswith("the dashboard") and "--tls" in sentence
    assert plaintext_exposures(Listeners("127.0.0.1:1", False, "", f"{host}:8080", True)) == []
    broker = host.strip("[]")
    (sentence,) = plaintext_exposures(Listeners("127.0.0.1:1", False, f"mqtt://{host}:1883", "", False))
    assert f"mqtts://{broker}:8883" in sentence
    assert plaintext_exposures(Listeners("127.0.0.1:1", False, f"mqtts://{host}:8883", "", False)) == []
    everything = Listeners(f"{host}:50051", False, f"mqtt://{host}:1883", f"{host}:8080", False)
    assert len(plaintext_exposures(everything)) == 3


@pytest.mark.parametrize(
    "flags",
    [
        ("--grpc", "0.0.0.0:0"),  # what the compose kit did before
        ("--grpc", "127.0.0.1:0", "--dashboard", "0.0.0.0:0"),
        ("--grpc", "127.0.0.1:0", "--mqtt", "mqtt://broker.example:1883"),
    ],
)
def test_serve_refuses_plaintext_beyond_loopback_and_binds_nothing(datadir: DataDir, flags: tuple[str, ...]) -> None:
    before = sorted(p.name for p in datadir.root.iterdir())
    done = fedfleet(datadir, "serve", *flags, timeout=60)
    assert done.returncode != 0
    assert "plaintext" in done.stderr and ALLOW_FLAG in done.stderr and "Traceback" not in done.stderr
    assert "--tls" in done.stderr or "mqtts://" in done.stderr
    # Nothing was started or written: no endpoints file, no TLS material, the serve lock is free.
    assert sorted(p.name for p in datadir.root.iterdir()) == before
    control = CoordinatorProcess(datadir, mqtt_url=None).start()  # on loopback the same directory serves
    try:
        assert control.endpoints["grpc"].startswith("127.0.0.1:")
    finally:
        control.kill()


def test_a_lab_that_accepts_plaintext_is_warned_and_the_dashboard_is_told(
    datadir: DataDir, caplog: pytest.LogCaptureFixture
) -> None:
    options = ServeOptions(mqtt_url="mqtt://broker.example:1883", allow_plaintext_network=True)
    with caplog.at_level(logging.WARNING, logger="server.coordinator"):
        coordinator = Coordinator(datadir, options)  # constructing connects to nothing
    try:
        (exposure,) = coordinator.plaintext_exposures
        assert "broker.example:1883" in exposure
        assert any(ALLOW_FLAG in r.getMessage() and exposure in r.getMessage() for r in caplog.records)
    finally:
        coordinator._serve_lock.close()
        coordinator.store.close()
        coordinator.rollouts.store.close()
    with pytest.raises(CoordinatorError, match=r"mqtts://broker\.example:8883"):
        Coordinator(datadir, ServeOptions(mqtt_url="mqtt://broker.example:1883"))


def test_tls_serves_devices_mutual_tls_and_the_dashboard_https(datadir: DataDir) -> None:
    coordinator = CoordinatorProcess(datadir, mqtt_url=None, extra_args=("--tls",)).start()
    try:
        url = coordinator.endpoints["dashboard"]
        assert url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(datadir.trust / "ca.pem"))
        with urllib.request.urlopen(url + "/api/session", context=context, timeout=10) as r:
            assert json.load(r)["plaintext_exposures"] == []
        request = urllib.request.Request(
            url + "/api/session",
            data=json.dumps({"token": datadir.operator_token()}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, context=context, timeout=10) as r:
            cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "Secure" in cookie
        with pytest.raises(OSError):  # plaintext HTTP to the TLS port gets no answer
            urllib.request.urlopen(url.replace("https://", "http://") + "/api/session", timeout=10)
        # gRPC: a client without a certificate from the fleet CA cannot register anything.
        ca = (datadir.trust / "ca.pem").read_bytes()
        with grpc.secure_channel(coordinator.endpoints["grpc"], grpc.ssl_channel_credentials(ca)) as channel:
            stub = fleet_pb2_grpc.FleetServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Register(pb.RegisterRequest(device_id="stranger"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with datadir.store() as store:
            assert store.devices() == []
    finally:
        coordinator.kill()
