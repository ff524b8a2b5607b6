"""Fast-forward recovery (TUF client workflow 5.3.11): a device that took metadata fast-forwarded to a huge
version, validly signed with a stolen online key, refuses the legitimate lower versions that follow (to it, a
rollback) until the operator rotates that key with `fedfleet keys rotate-root --role ...`; then it takes the next
release. ngclient recovers because the metadata it trusted no longer verifies under the rotated root.

The attack tests' fixture (tests/agent/test_update_attacks.py): the real FleetService over a real data
directory's TUF repository and the agent's real update function with ngclient, the device running 1.0.0. The
attacker holds copies of the coordinator's online keys and sits between the device and the coordinator (a
mirror, a network position): a second FleetService serving a copy of the repository whose metadata the attacker
signed again. The operator's rotation is the real command, run as a person types it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, MetaFile, Snapshot, Timestamp
from tuf.api.serialization.json import JSONSerializer

from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.reasons import Reason
from edge_agent.transport import GrpcTransport
from edge_agent.updater import Outcome, UpdateResult
from server.trust.releases import publish_release
from server.trust.repository import Repository, release_role
from simulations.dense_tflite import build_dense_model, random_dense_layers
from tests.agent.test_update_attacks import DEVICE, Env, env  # noqa: F401 (env: the attack tests' fixture)
from tests.support import GrpcServerThread, fedfleet

FAR = 2**31  # the attacker's version: beyond anything the repository will sign for years
TIMESTAMP_ROLLBACK = f"must be >= {FAR}"  # ngclient: "New timestamp version N must be >= 2147483648"


def fast_forward(e: Env, repository: Path, snapshot: bool) -> None:
    """Sign again, in the attacker's copy of the repository: the timestamp as version FAR (the timestamp key)
    and, with `snapshot` (the snapshot key too), the latest snapshot as version FAR, naming 1.0.0's release role
    at version FAR. An update to another release does not load that role, so nothing checks its version now,
    and every later snapshot must name it at FAR or more."""
    meta = repository / "metadata"

    def write(md: Metadata[Any], name: str, role: str) -> None:
        md.signatures.clear()
        md.sign(e.signer(role))
        (meta / name).write_bytes(md.to_bytes(JSONSerializer()))

    timestamp: Metadata[Timestamp] = Metadata.from_file(str(meta / "timestamp.json"))
    if snapshot:
        forged: Metadata[Snapshot] = Metadata.from_file(str(meta / f"{e.latest('snapshot')}.snapshot.json"))
        forged.signed.version = FAR
        forged.signed.meta[f"{release_role('digits/1.0.0/model.tflite')}.json"] = MetaFile(version=FAR)
        write(forged, f"{FAR}.snapshot.json", "snapshot")
        timestamp.signed.snapshot_meta = MetaFile(version=FAR)
    timestamp.signed.version = FAR
    write(timestamp, "timestamp.json", "timestamp")


@contextmanager
def through_the_attacker(e: Env, repository: Path) -> Iterator[None]:
    """The device's gRPC goes to a FleetService serving `repository` (assignments and freshness as usual)."""
    store = e.d.store()
    attacker = GrpcServerThread(store, Repository(repository, e.d.keys))
    live = e.ctx.transport
    e.ctx.transport = GrpcTransport(attacker.address, DEVICE, timeout=10)
    try:
        yield
    finally:
        e.ctx.transport.close()
        e.ctx.transport = live
        attacker.stop()
        store.close()


def trusted(e: Env, role: str) -> int:
    """The version of `role` the device trusts (what its ngclient keeps)."""
    version: int = Metadata.from_file(str(e.ctx.store.tuf_dir / f"{role}.json")).signed.version
    return version


def rotate_root(e: Env, *roles: str) -> int:
    """`fedfleet keys rotate-root [--role ROLE ...]` in a process of its own; the new root version."""
    done = fedfleet(e.d, "keys", "rotate-root", *(f"--role={role}" for role in roles), "--json")
    assert done.returncode == 0, done.stderr
    version: int = json.loads(done.stdout)["root_version"]
    return version


def fast_forwarded_then_next_release(e: Env, tmp_path: Path, snapshot: bool) -> bytes:
    """The device updates to 2.0.0 through the attacker, who serves the metadata fast-forwarded: all of it is
    validly signed, so the device installs 2.0.0 and trusts version FAR from then on. Then the coordinator
    publishes 2.1.0 as usual; returns the device's assignment to it."""
    attacker = tmp_path / "attacker"
    shutil.copytree(e.d.repository_dir, attacker)
    fast_forward(e, attacker, snapshot)
    with through_the_attacker(e, attacker):
        taken = e.apply(e.assign("digits@2.0.0"))
    assert taken.outcome is Outcome.COMMITTED, taken
    assert e.active_sha() == e.sha["2.0.0"]
    forged = ("timestamp", "snapshot") if snapshot else ("timestamp",)
    assert {role: trusted(e, role) for role in forged} == dict.fromkeys(forged, FAR)
    with e.d.store() as store:
        model = build_dense_model(random_dense_layers([64, 32, 10], 3))
        e.sha["2.1.0"] = publish_release(e.d.repository(), store, model, "digits", "2.1.0").release.sha256
    return e.assign("digits@2.1.0")


def assert_held_back(e: Env, result: UpdateResult, because: str) -> None:
    """Refused as a rollback (the usual reason), `because` in the detail; 2.0.0 stays active."""
    assert (result.outcome, result.reason) == (Outcome.REJECTED, Reason.METADATA_MISMATCH), result
    assert because in result.detail, result.detail
    assert (e.events[-1].kind, e.events[-1].reason) == (pb.EVENT_KIND_REJECTED, Reason.METADATA_MISMATCH)
    assert e.active_sha() == e.sha["2.0.0"]


def assert_recovered(e: Env, result: UpdateResult, root: int) -> None:
    """2.1.0 installed; the device trusts the rotated root and the coordinator's own timestamp and snapshot."""
    assert result.outcome is Outcome.COMMITTED, result
    assert e.active_sha() == e.sha["2.1.0"]
    assert trusted(e, "root") == root
    assert (e.ctx.store.tuf_dir / "timestamp.json").read_bytes() == (e.meta / "timestamp.json").read_bytes()
    assert trusted(e, "timestamp") < FAR and trusted(e, "snapshot") == e.latest("snapshot") < FAR


def test_a_timestamp_fast_forwarded_with_the_stolen_timestamp_key_is_undone_by_rotating_that_key(
    env: Env,  # noqa: F811
    tmp_path: Path,
) -> None:
    # Prepare
    payload = fast_forwarded_then_next_release(env, tmp_path, snapshot=False)
    assert_held_back(env, env.apply(payload), TIMESTAMP_ROLLBACK)
    assert rotate_root(env) == 2  # the root key alone: the stolen timestamp key still signs
    assert_held_back(env, env.apply(payload), TIMESTAMP_ROLLBACK)
    assert trusted(env, "timestamp") == FAR

    # Execute
    assert rotate_root(env, "timestamp") == 3
    result = env.apply(payload)  # the very assignment refused twice: its counter was never burned

    # Assert
    assert_recovered(env, result, root=3)
    with through_the_attacker(env, tmp_path / "attacker"):  # the forged timestamp, offered again: refused
        again = env.apply(env.assign("digits@2.0.0"))
    assert (again.outcome, again.reason) == (Outcome.REJECTED, Reason.METADATA_BAD_SIGNATURE), again
    assert env.active_sha() == env.sha["2.1.0"]


def test_a_snapshot_fast_forwarded_with_the_stolen_snapshot_key_needs_the_snapshot_key_rotated_too(
    env: Env,  # noqa: F811
    tmp_path: Path,
) -> None:
    # Prepare
    payload = fast_forwarded_then_next_release(env, tmp_path, snapshot=True)
    assert_held_back(env, env.apply(payload), TIMESTAMP_ROLLBACK)
    assert rotate_root(env, "timestamp") == 2
    # The timestamp recovered, but the forged snapshot, still validly signed, names 1.0.0's role at FAR.
    assert_held_back(env, env.apply(payload), f"version 1, got {FAR}")
    assert trusted(env, "timestamp") < FAR and trusted(env, "snapshot") == FAR

    # Execute
    assert rotate_root(env, "snapshot") == 3
    result = env.apply(payload)

    # Assert
    assert_recovered(env, result, root=3)
