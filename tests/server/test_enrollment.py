"""Enrollment mints an identity only for a name and bundle that pass: fedfleet's own names cannot be enrolled,
and a refused enrollment (here a bad fleet name) leaves no certificate, key or record behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from server import audit
from server.datadir import DataDir
from tests.support import fedfleet


def _enroll(d: DataDir, *args: str) -> subprocess.CompletedProcess[str]:
    return fedfleet(d, "devices", "enroll", *args)


def _certificates(d: DataDir) -> list[str]:
    with d.store() as store:
        return [r[0] for r in store.db.execute("SELECT subject FROM certificates WHERE kind = 'device'")]


@pytest.mark.parametrize(
    ("name", "fleet", "message"),
    [
        ("fedfleet-coordinator", "home", "names starting 'fedfleet-' are fedfleet's own"),
        ("fedfleet-broker", "home", "names starting 'fedfleet-' are fedfleet's own"),
        ("pi-1", "bad fleet!", "fleet 'bad fleet!' must be letters"),
    ],
)
def test_a_refused_enrollment_mints_nothing(
    datadir: DataDir, tmp_path: Path, name: str, fleet: str, message: str
) -> None:
    out = tmp_path / "bundle"
    refused = _enroll(datadir, name, "--fleet", fleet, "--out", str(out))
    assert refused.returncode == 1 and message in refused.stderr
    assert not (out / "device-key.pem").exists() and not (out / "device.pem").exists()
    assert not (out / "agent.toml").exists()
    assert _certificates(datadir) == []
    granted = _enroll(datadir, "pi-2", "--fleet", "home", "--out", str(tmp_path / "ok"))
    assert granted.returncode == 0, granted.stderr
    assert _certificates(datadir) == ["pi-2"] and (tmp_path / "ok" / "device-key.pem").is_file()


def test_a_device_cannot_move_itself_to_another_fleet_but_the_operator_can(datadir: DataDir) -> None:
    import grpc

    from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
    from edge_agent.contract._proto.fedfleet.v1.fleet_pb2_grpc import FleetServiceStub
    from tests.support import GrpcServerThread

    with datadir.store() as store:
        server = GrpcServerThread(store, datadir.repository())
        try:
            with grpc.insecure_channel(server.address) as channel:
                stub = FleetServiceStub(channel)
                stub.Register(
                    pb.RegisterRequest(device_id="pi-1", fleet="home", labels={"site": "kitchen"}), timeout=10
                )
                claim = pb.RegisterRequest(device_id="pi-1", fleet="lab", labels={"site": "vault"}, agent_version="2")
                stub.Register(claim, timeout=10)  # the device claims another fleet and labels
            row = store.device("pi-1")
            assert (row["fleet"], row["labels"], row["agent_version"]) == ("home", {"site": "kitchen"}, "2")
        finally:
            server.stop()
    moved = _label(datadir, "pi-1", "--fleet", "lab", "--label", "site=roof", "--json")
    assert moved.returncode == 0, moved.stderr
    with datadir.store() as store:
        row = store.device("pi-1")
        (entry,) = audit.entries(store, action="device.label")
    assert (row["fleet"], row["labels"]) == ("lab", {"site": "roof"})
    assert entry["detail"]["fleet"] == ["home", "lab"]
    refused = _label(datadir, "pi-1", "--fleet", "bad fleet!")
    assert refused.returncode == 1 and "must be letters" in refused.stderr
    assert _label(datadir, "pi-9", "--fleet", "lab").returncode == 1  # no such device


def _label(d: DataDir, *args: str) -> subprocess.CompletedProcess[str]:
    return fedfleet(d, "devices", "label", *args)


def test_enrolling_a_name_again_revokes_its_previous_identity(datadir: DataDir, tmp_path: Path) -> None:
    assert _enroll(datadir, "pi-3", "--fleet", "home", "--out", str(tmp_path / "first")).returncode == 0
    with datadir.store() as store:
        (first,) = [r[0] for r in store.db.execute("SELECT serial FROM certificates WHERE subject = 'pi-3'")]
        assert not store.certificate_revoked(first)
    assert _enroll(datadir, "pi-3", "--fleet", "home", "--out", str(tmp_path / "second"), "--force").returncode == 0
    with datadir.store() as store:
        serials = [r[0] for r in store.db.execute("SELECT serial FROM certificates WHERE subject = 'pi-3'")]
        assert len(serials) == 2 and store.certificate_revoked(first)
        assert not store.certificate_revoked(next(s for s in serials if s != first))
        (revoke,) = audit.entries(store, action="device.revoke")
    assert revoke["detail"] == {"serials": [first], "why": "enrolled again"}
    assert (datadir.trust / "crl.pem").is_file()  # the broker's CRL names the old certificate
