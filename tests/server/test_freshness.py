"""The coordinator's side of freshness: the director's statements (signed with each assignment, re-signed before
they expire, never going back), the Check rpc on a real gRPC server, the devices it shows as behind (stale or
lagging) in SQL, the CLI and the alerts, and freshness_hours in config.toml."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from edge_agent.assignment import load_director_keys, verify_freshness
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2_grpc as pb_grpc
from server.datadir import DataDir
from server.errors import DataDirError
from server.loop.controller import LoopController
from server.loop.kinds import AlertKind
from server.store import Store, now_ms
from server.store.freshness import FreshnessRecords
from server.store.loop import AlertRecords
from server.trust.director import Director
from server.trust.releases import publish_release
from tests.support import GrpcServerThread, fedfleet

HOUR_MS = 3_600_000


@dataclass
class Env:
    d: DataDir
    store: Store
    director: Director


@pytest.fixture
def env(datadir: DataDir, model_bytes: dict[str, bytes]) -> Iterator[Env]:
    store = datadir.store()
    for device in ("pi-1", "pi-2"):
        store.register_device(device, "lab", {}, {}, "test")
    for version, data in model_bytes.items():
        publish_release(datadir.repository(), store, data, "digits", version)
    yield Env(datadir, store, datadir.director())
    store.close()


def _statement(env: Env, device: str) -> pb.Freshness:
    row = FreshnessRecords(env.store).current(device)
    assert row is not None
    signed = pb.SignedFreshness.FromString(row["signed"])
    keys = load_director_keys(json.loads((env.d.trust / "director_keys.json").read_text()))
    f = verify_freshness(signed, keys, device)  # the agent's own check: the director signed it for this device
    return pb.Freshness(
        device_id=f.device_id, counter=f.counter, issued_at_ms=f.issued_at_ms, expires_at_ms=f.expires_at_ms
    )


def test_each_assignment_is_stated_and_statements_are_renewed_before_they_expire(env: Env) -> None:
    env.director.assign(env.store, ["pi-1"], env.store.release("digits@1.0.0"))
    first = _statement(env, "pi-1")
    assert first.counter == 1 and first.expires_at_ms - first.issued_at_ms == 24 * HOUR_MS  # config's default
    assert FreshnessRecords(env.store).current("pi-2") is None  # no assignment yet: the refresh signs one

    assert env.director.refresh_freshness(env.store, first.issued_at_ms) == 1  # pi-2 only: pi-1's is new
    assert _statement(env, "pi-2").counter == 0
    assert env.director.refresh_freshness(env.store, first.issued_at_ms + 11 * HOUR_MS) == 0  # under half used
    renewed_at = first.issued_at_ms + 13 * HOUR_MS
    assert env.director.refresh_freshness(env.store, renewed_at) == 2  # past half its validity: both renewed
    renewed = _statement(env, "pi-1")
    assert (renewed.counter, renewed.issued_at_ms) == (1, renewed_at)
    assert {r["device_id"] for r in FreshnessRecords(env.store).unpublished()} == {"pi-1", "pi-2"}


def test_a_stored_statement_never_goes_back(env: Env) -> None:
    env.director.assign(env.store, ["pi-1"], env.store.release("digits@1.0.0"))
    env.director.assign(env.store, ["pi-1"], env.store.release("digits@2.0.0"))
    stale_view = env.director.sign_freshness("pi-1", 1, now_ms())  # signed from counters read before counter 2
    records = FreshnessRecords(env.store)
    assert not records.put("pi-1", 1, now_ms(), now_ms() + HOUR_MS, stale_view.SerializeToString())
    assert _statement(env, "pi-1").counter == 2


def test_the_directors_answer_is_the_current_statement_and_the_newest_assignment(env: Env) -> None:
    records = FreshnessRecords(env.store)
    assert records.answer("pi-1") == (None, 0, None)
    for version in ("1.0.0", "2.0.0"):
        env.director.assign(env.store, ["pi-1"], env.store.release(f"digits@{version}"))
    statement, counter, assignment = records.answer("pi-1")
    assert assignment is not None and counter == 2
    assert pb.Assignment.FromString(pb.SignedAssignment.FromString(assignment).assignment).release_id == "digits@2.0.0"
    current = records.current("pi-1")
    assert current is not None and statement == current["signed"]
    assert records.answer("pi-2") == (None, 0, None)  # another device's rows are never its answer


def test_check_answers_the_statement_and_only_a_newer_assignment(env: Env) -> None:
    env.director.assign(env.store, ["pi-1"], env.store.release("digits@1.0.0"))
    server = GrpcServerThread(env.store, env.d.repository())
    try:
        with server.channel() as channel:
            stub = pb_grpc.FleetServiceStub(channel)
            behind = stub.Check(pb.CheckRequest(device_id="pi-1", counter=0), timeout=10)
            current = stub.Check(pb.CheckRequest(device_id="pi-1", counter=1), timeout=10)
            assert behind.HasField("freshness") and behind.HasField("assignment")
            assert pb.Assignment.FromString(behind.assignment.assignment).counter == 1
            assert current.HasField("freshness") and not current.HasField("assignment")
            registered = stub.Register(pb.RegisterRequest(device_id="pi-1", fleet="lab"), timeout=10)
            assert registered.freshness == behind.freshness and registered.assignment == behind.assignment
            for request, code in [
                (pb.CheckRequest(device_id="ghost", counter=0), grpc.StatusCode.NOT_FOUND),
                (pb.CheckRequest(device_id="../etc", counter=0), grpc.StatusCode.INVALID_ARGUMENT),
            ]:
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Check(request, timeout=10)
                assert refused.value.code() == code  # type: ignore[attr-defined]
    finally:
        server.stop()
    assert not env.store.is_device("ghost")  # a refused check changed nothing


def test_devices_behind_are_listed_and_alerted_and_resolved(env: Env) -> None:
    env.director.assign(env.store, ["pi-1", "pi-2"], env.store.release("digits@2.0.0"))
    env.store.set_status("pi-1", True, "digits@1.0.0", "t", 0, "idle", "")  # still on the old release
    env.store.set_status("pi-2", True, "digits@2.0.0", "t", 1, "idle", "", stale=True, fresh_until=now_ms() - 1)
    records = FreshnessRecords(env.store)
    assert records.lagging(now_ms() - HOUR_MS) == []  # assigned just now: within the bound
    later = now_ms() + 25 * HOUR_MS
    rows = {r["device_id"]: (r["stale"], r["lagging"]) for r in records.behind(later - 24 * HOUR_MS)}
    assert rows == {"pi-1": (False, True), "pi-2": (True, False)}

    loop = LoopController(env.d, env.store, env.d.rollouts(env.store), env.d.policy(), 10.0)
    loop.tick(later)
    open_alerts = {(a["kind"], a["subject"]) for a in AlertRecords(env.store).recent("open")}
    assert {(AlertKind.DEVICES_STALE, "lab"), (AlertKind.DEVICES_LAGGING, "lab")} <= open_alerts

    env.store.set_status("pi-1", True, "digits@2.0.0", "t", 1, "idle", "")
    env.store.set_status("pi-2", True, "digits@2.0.0", "t", 1, "idle", "", stale=False, fresh_until=later)
    loop.tick(later + 20_000)
    assert not [a for a in AlertRecords(env.store).recent("open") if a["kind"] in ("devices_stale", "devices_lagging")]


def test_devices_behind_cli_lists_them_and_refuses_bad_input(env: Env) -> None:
    env.director.assign(env.store, ["pi-1"], env.store.release("digits@2.0.0"))
    env.store.set_status("pi-1", True, "digits@1.0.0", "t", 0, "idle", "")
    listed = fedfleet(env.d, "devices", "behind", "--after", "0", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(r["device_id"], r["lagging"], r["assigned_release"]) for r in json.loads(listed.stdout)] == [
        ("pi-1", True, "digits@2.0.0")
    ]
    within = fedfleet(env.d, "devices", "behind", "--json")  # the default bound: freshness_hours (24)
    assert within.returncode == 0 and json.loads(within.stdout) == []
    refused = fedfleet(env.d, "devices", "behind", "--after", "-5")
    assert refused.returncode != 0 and "--after" in refused.stderr


@pytest.mark.parametrize("value", ["0", "-1", '"soon"'])
def test_a_freshness_bound_that_is_not_positive_is_refused(datadir: DataDir, value: str) -> None:
    text = datadir.config_path.read_text()
    assert "freshness_hours = 24.0" in text
    datadir.config_path.write_text(text.replace("freshness_hours = 24.0", f"freshness_hours = {value}"))
    with pytest.raises(DataDirError, match="freshness_hours"):
        datadir.config()
