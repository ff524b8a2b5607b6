"""`fedfleet releases retire`: the release leaves the TUF repository (targets and snapshot shrink, new versions
signed as usual, the bytes deleted), the store marks it retired and the audit records it; refused, changing
nothing, for a running or assigned release, a live rollout's release or its rollback target, and an unknown one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Snapshot, Targets, Timestamp

from server import audit
from server.datadir import DataDir
from server.rollout.engine import Phase
from server.store.releases import ReleaseRecords
from server.store.rollouts import RolloutRecords
from server.trust.releases import publish_release
from server.trust.repository import release_role
from tests.support import fedfleet

V1, V2 = "digits@1.0.0", "digits@2.0.0"


@pytest.fixture
def published(datadir: DataDir, model_bytes: dict[str, bytes]) -> DataDir:
    with datadir.store() as store:
        for version, data in model_bytes.items():
            publish_release(datadir.repository(), store, data, "digits", version)
        store.register_device("pi-a", "lab", {}, {}, "test")
    return datadir


def _files(d: DataDir) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(d.repository_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


def _latest(d: DataDir, role: str) -> Metadata:  # type: ignore[type-arg]
    meta = d.repository_dir / "metadata"
    if role == Timestamp.type:
        return Metadata.from_file(str(meta / "timestamp.json"))
    version = max(int(p.name.split(".")[0]) for p in meta.glob(f"*.{role}.json"))
    return Metadata.from_file(str(meta / f"{version}.{role}.json"))


def _check_signed(d: DataDir) -> None:
    """The newest root verifies targets, snapshot and timestamp, and the snapshot names each delegated role."""
    root = _latest(d, "root")
    targets, snapshot, timestamp = (_latest(d, r) for r in (Targets.type, Snapshot.type, Timestamp.type))
    for role, md in ((Targets.type, targets), (Snapshot.type, snapshot), (Timestamp.type, timestamp)):
        root.verify_delegate(role, md)  # raises unless signed by the role's keys
    assert timestamp.signed.snapshot_meta.version == snapshot.signed.version
    assert snapshot.signed.meta["targets.json"].version == targets.signed.version
    delegations = targets.signed.delegations
    roles = set(delegations.roles) if delegations is not None and delegations.roles else set()
    assert {k[: -len(".json")] for k in snapshot.signed.meta} - {"targets"} == roles
    meta = d.repository_dir / "metadata"
    for role in roles:
        version = snapshot.signed.meta[f"{role}.json"].version
        targets.verify_delegate(role, Metadata.from_file(str(meta / f"{version}.{role}.json")))


def test_retire_shrinks_targets_and_snapshot_and_deletes_the_bytes(published: DataDir) -> None:
    d = published
    role = release_role("digits/1.0.0/model.tflite")
    targets_before, snapshot_before = _latest(d, Targets.type), _latest(d, Snapshot.type)
    assert f"{role}.json" in snapshot_before.signed.meta
    artifact = next((d.repository_dir / "targets" / "digits" / "1.0.0").glob("*.model.tflite"))

    done = fedfleet(d, "releases", "retire", V1, "--json")
    assert done.returncode == 0, done.stderr

    targets, snapshot = _latest(d, Targets.type), _latest(d, Snapshot.type)
    assert targets.signed.version == targets_before.signed.version + 1
    assert snapshot.signed.version == snapshot_before.signed.version + 1
    assert role not in (targets.signed.delegations.roles or {})
    assert (
        f"{role}.json" not in snapshot.signed.meta and len(snapshot.signed.meta) == len(snapshot_before.signed.meta) - 1
    )
    assert len(targets.to_bytes()) < len(targets_before.to_bytes())
    assert len(snapshot.to_bytes()) < len(snapshot_before.to_bytes())
    assert release_role("digits/2.0.0/model.tflite") in (targets.signed.delegations.roles or {})
    _check_signed(d)
    assert not artifact.exists() and not list((d.repository_dir / "metadata").glob(f"*.{role}.json"))
    assert str(artifact) in json.loads(done.stdout)["deleted"]
    assert d.repository().target_path("digits/1.0.0/" + artifact.name) is None
    with d.store() as store:
        assert ReleaseRecords(store).retired(V1) is not None
        entry = audit.entries(store, 1)[0]
        assert (entry["action"], entry["subject"]) == ("release.retire", V1)
        assert not audit.verify(store)[1]
    listed = {r["id"]: r for r in json.loads(fedfleet(d, "releases", "list", "--json").stdout)}
    assert isinstance(listed[V1]["retired_at"], int) and listed[V2]["retired_at"] is None
    assert V1 in fedfleet(d, "releases", "list").stdout  # still listed, with the time it was retired
    # Once retired: retiring again and publishing the same version again are refused.
    again = fedfleet(d, "releases", "retire", V1)
    assert again.returncode == 1 and "already retired" in again.stderr


def test_republishing_a_retired_version_is_refused(published: DataDir, model_bytes: dict[str, bytes]) -> None:
    d = published
    assert fedfleet(d, "releases", "retire", V1).returncode == 0
    with d.store() as store, pytest.raises(Exception, match="was retired; publish the model under a new version"):
        publish_release(d.repository(), store, model_bytes["1.0.0"], "digits", "1.0.0")


def _refused(d: DataDir, release_id: str, words: str) -> None:
    before = _files(d)
    with d.store() as store:
        seq = audit.entries(store, 1)[0]["seq"]
    done = fedfleet(d, "releases", "retire", release_id)
    assert done.returncode == 1
    assert words in done.stderr and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert _files(d) == before  # nothing signed, nothing deleted
    with d.store() as store:
        assert ReleaseRecords(store).retired(release_id) is None and audit.entries(store, 1)[0]["seq"] == seq


def test_refused_while_a_device_runs_it(published: DataDir) -> None:
    with published.store() as store:
        store.set_status("pi-a", True, V1, "digits/1.0.0/model.tflite", 1, "committed", "")
    _refused(published, V1, "device(s) pi-a run it")


def test_refused_while_a_device_is_assigned_it(published: DataDir) -> None:
    with published.store() as store:
        store.add_assignment("pi-a", 1, V2, "", b"signed", 0)
    _refused(published, V2, "device(s) pi-a are assigned it")


def test_refused_for_a_live_rollouts_rollback_target(published: DataDir) -> None:
    d = published
    with d.store() as store:
        store.set_status("pi-a", True, V2, "digits/2.0.0/model.tflite", 2, "committed", "")
        store.add_assignment("pi-a", 2, V2, "r1", b"signed", 0)
        rollouts = RolloutRecords(store)
        rollouts.insert("r1", V2, "{}", str(Phase.GATING), 0)
        rollouts.add_devices("r1", [("pi-a", 0, V1)])
    _refused(d, V1, "rollout r1 could roll back to it")
    # Once the rollout has ended, its previous release may go.
    with d.store() as store:
        store.db.execute("UPDATE rollouts SET phase = ? WHERE id = 'r1'", [str(Phase.COMPLETED)])
    assert fedfleet(d, "releases", "retire", V1).returncode == 0


def test_refused_for_a_pending_rollouts_release(published: DataDir) -> None:
    with published.store() as store:
        RolloutRecords(store).insert("r2", V2, "{}", str(Phase.PENDING), 0)
    _refused(published, V2, "rollout r2 rolls it out")


@pytest.mark.parametrize("release_id", ["digits@9.9.9", "nonsense", ""])
def test_unknown_release_is_refused(published: DataDir, release_id: str) -> None:
    _refused(published, release_id, "no release")


def test_the_last_release_retired_leaves_no_delegation(published: DataDir, tmp_path: Path) -> None:
    d = published
    assert fedfleet(d, "releases", "retire", V1).returncode == 0
    assert fedfleet(d, "releases", "retire", V2).returncode == 0
    targets, snapshot = _latest(d, Targets.type), _latest(d, Snapshot.type)
    assert targets.signed.delegations is None and list(snapshot.signed.meta) == ["targets.json"]
    _check_signed(d)
    assert not list((d.repository_dir / "targets").rglob("*.tflite"))
