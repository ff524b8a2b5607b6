"""Each TUF/Uptane attack is refused, the good model stays active, and the event names the reason.

The agent's real update function runs against the real FleetService on a free port; the attacks edit the
repository on disk with python-tuf's own Metadata API, as an attacker who controls the server's files would.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Root
from tuf.api.serialization.json import JSONSerializer

from edge_agent.assignment import load_director_keys
from edge_agent.contract import LIMITS
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.errors import AgentError, AssignmentError
from edge_agent.state import AgentState, StateStore
from edge_agent.transport import GrpcTransport
from edge_agent.updater import Outcome, UpdateContext, UpdateResult, accept_freshness, apply_assignment
from server.datadir import DataDir
from server.ingest.grpc_service import FleetService
from server.trust.director import Director
from server.trust.releases import publish_release
from server.trust.repository import load_private_key, release_role
from tests.support import GrpcServerThread

DEVICE = "dev-1"


@dataclass
class Env:
    d: DataDir
    server: GrpcServerThread
    ctx: UpdateContext
    events: list[pb.UpdateEvent]
    sha: dict[str, str]

    def assign(self, release_id: str, device: str = DEVICE, director: Director | None = None) -> bytes:
        store = self.d.store()
        try:
            (director or self.d.director()).assign(store, [device], store.release(release_id))
            row = store.current_assignment(device)
        finally:
            store.close()
        assert row is not None
        signed: bytes = row["signed"]
        return signed

    def apply(self, payload: bytes) -> UpdateResult:
        return apply_assignment(payload, self.ctx)

    def active_sha(self) -> str:
        state = self.ctx.store.load()
        assert state.active is not None
        on_disk = hashlib.sha256(self.ctx.store.model_path(state.active).read_bytes()).hexdigest()
        assert state.active_info is not None and state.active_info.sha256 == on_disk
        return on_disk

    # ----- an attacker's edits, through python-tuf's API -----

    @property
    def meta(self) -> Path:
        return self.d.repository_dir / "metadata"

    def signer(self, role: str) -> CryptoSigner:
        return CryptoSigner(load_private_key(self.d.keys / f"{role}.pem"))

    def write(self, md: Metadata, name: str, signers: list[CryptoSigner]) -> None:  # type: ignore[type-arg]
        md.signatures.clear()
        for s in signers:
            md.sign(s, append=True)
        (self.meta / name).write_bytes(md.to_bytes(JSONSerializer()))

    def latest(self, role: str) -> int:
        return max(int(p.name.split(".")[0]) for p in self.meta.glob(f"*.{role}.json"))

    def serve_snapshot(self, **versions: int) -> None:
        """Sign a new snapshot naming these versions ("targets", or a release's role), the other roles as they
        were, and a new timestamp over it."""
        s = self.latest("snapshot")
        snapshot = Metadata.from_file(str(self.meta / f"{s}.snapshot.json"))
        snapshot.signed.version = s + 1
        for role, n in versions.items():
            snapshot.signed.meta[f"{role}.json"] = MetaFile(version=n)
        self.write(snapshot, f"{s + 1}.snapshot.json", [self.signer("snapshot")])
        ts = Metadata.from_file(str(self.meta / "timestamp.json"))
        ts.signed.version += 1
        ts.signed.snapshot_meta = MetaFile(version=s + 1)
        self.write(ts, "timestamp.json", [self.signer("timestamp")])

    def serve_targets_version(self, n: int) -> None:
        self.serve_snapshot(targets=n)

    def serve_role_version(self, role: str, n: int) -> None:
        self.serve_snapshot(**{role: n})

    def release_role(self, release: str) -> tuple[str, Metadata]:  # type: ignore[type-arg]
        """A release's delegated role name and its latest metadata."""
        role = release_role(f"digits/{release}/model.tflite")
        return role, Metadata.from_file(str(self.meta / f"{self.latest(role)}.{role}.json"))

    def target_file(self, release: str) -> Path:
        return next((self.d.repository_dir / "targets" / "digits" / release).glob("*.model.tflite"))


@pytest.fixture
def env(datadir: DataDir, model_bytes: dict[str, bytes], tmp_path: Path) -> Iterator[Env]:
    store = datadir.store()
    store.register_device(DEVICE, "lab", {}, {}, "test")
    store.register_device("dev-2", "lab", {}, {}, "test")
    sha = {}
    for version, data in model_bytes.items():
        sha[version] = publish_release(datadir.repository(), store, data, "digits", version).release.sha256
    server = GrpcServerThread(store, datadir.repository())
    state = StateStore(tmp_path / "agent")
    state.seed_trust_root(datadir.trust / "root.json")
    events: list[pb.UpdateEvent] = []
    transport = GrpcTransport(server.address, DEVICE, timeout=10)
    director_keys = load_director_keys(__import__("json").loads((datadir.trust / "director_keys.json").read_text()))
    ctx = UpdateContext(DEVICE, state, transport, director_keys, events.append)
    e = Env(datadir, server, ctx, events, sha)
    first = e.apply(e.assign("digits@1.0.0"))
    assert first.outcome is Outcome.COMMITTED, first
    assert e.active_sha() == sha["1.0.0"]
    yield e
    transport.close()
    server.stop()
    store.close()


def assert_refused(e: Env, result: UpdateResult, reason: str) -> None:
    assert result.outcome is Outcome.REJECTED, result
    assert result.reason == reason, result
    assert e.events[-1].kind == pb.EVENT_KIND_REJECTED and e.events[-1].reason == reason
    assert e.active_sha() == e.sha["1.0.0"]  # the good model stays active, byte for byte
    assert e.ctx.store.load().last_reason == reason


def test_upgrade_and_rollback_are_accepted_but_a_replay_is_not(env: Env) -> None:
    first = env.assign("digits@1.0.0")  # counter 2 (counter 1 was consumed by the fixture)
    assert env.apply(first).outcome is Outcome.COMMITTED
    upgrade = env.apply(env.assign("digits@2.0.0"))
    assert upgrade.outcome is Outcome.COMMITTED and env.active_sha() == env.sha["2.0.0"]

    rollback = env.apply(env.assign("digits@1.0.0"))  # a new, higher counter pointing at the older target
    assert rollback.outcome is Outcome.COMMITTED and env.active_sha() == env.sha["1.0.0"]

    upgrade_again = env.apply(env.assign("digits@2.0.0"))
    assert upgrade_again.outcome is Outcome.COMMITTED
    replayed = env.apply(first)  # the old, validly signed assignment for 1.0.0
    assert replayed.outcome is Outcome.REJECTED and replayed.reason == "assignment_replay"
    assert env.active_sha() == env.sha["2.0.0"]


def test_same_counter_twice_is_not_reapplied(env: Env) -> None:
    payload = env.assign("digits@2.0.0")
    assert env.apply(payload).outcome is Outcome.COMMITTED
    count = len(env.events)
    assert env.apply(payload).outcome is Outcome.UNCHANGED  # e.g. the retained message again after reconnect
    assert len(env.events) == count


def test_tampered_target_bytes(env: Env) -> None:
    f = env.target_file("2.0.0")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    assert_refused(env, env.apply(env.assign("digits@2.0.0")), "target_hash_mismatch")


def test_target_shorter_than_signed(env: Env) -> None:
    f = env.target_file("2.0.0")
    f.write_bytes(f.read_bytes()[:-100])
    assert_refused(env, env.apply(env.assign("digits@2.0.0")), "target_length_mismatch")


def test_endless_data_is_cut_at_the_signed_length(env: Env) -> None:
    f = env.target_file("2.0.0")
    f.write_bytes(f.read_bytes() + b"\0" * 5_000_000)
    assert_refused(env, env.apply(env.assign("digits@2.0.0")), "target_too_large")
    assert not list(env.ctx.store.downloads.iterdir())  # nothing unverified is kept


def test_assignment_signed_by_unknown_key(env: Env) -> None:
    rogue = Director(Ed25519PrivateKey.generate())
    assert_refused(env, env.apply(env.assign("digits@2.0.0", director=rogue)), "assignment_unknown_key")


def test_assignment_with_forged_signature(env: Env) -> None:
    signed = pb.SignedAssignment.FromString(env.assign("digits@2.0.0"))
    signed.signature = bytes([signed.signature[0] ^ 1]) + signed.signature[1:]
    assert_refused(env, env.apply(signed.SerializeToString()), "assignment_bad_signature")


def test_assignment_for_another_device(env: Env) -> None:
    assert_refused(env, env.apply(env.assign("digits@2.0.0", device="dev-2")), "assignment_wrong_device")


def test_director_and_repository_disagree(env: Env) -> None:
    """Mix-and-match between director and image repository: the path of 2.0.0 with the hash of 1.0.0."""
    store = env.d.store()
    v2 = store.release("digits@2.0.0")
    store.close()
    forged = pb.Assignment(
        device_id=DEVICE,
        target_path=v2.target_path,
        target_length=v2.length,
        target_sha256=env.sha["1.0.0"],
        counter=99,
        release_id=v2.id,
    )
    payload = env.d.director().sign(forged).SerializeToString()
    assert_refused(env, env.apply(payload), "target_mismatch")


def _forged(env: Env, counter: int, target_path: str | None = None) -> bytes:
    """An assignment the director signed (its key is the attacker's here) for 2.0.0's bytes, at `counter`."""
    store = env.d.store()
    v2 = store.release("digits@2.0.0")
    store.close()
    forged = pb.Assignment(
        device_id=DEVICE,
        target_path=target_path or v2.target_path,
        target_length=v2.length,
        target_sha256=v2.sha256,
        counter=counter,
        release_id=v2.id,
    )
    return env.d.director().sign(forged).SerializeToString()


def test_an_assignment_for_a_target_the_repository_does_not_sign_burns_no_counter(env: Env) -> None:
    before = env.ctx.store.load().highest_counter
    assert_refused(env, env.apply(_forged(env, 50, "digits/9.9.9/model.tflite")), "target_unknown")
    assert env.ctx.store.load().highest_counter == before  # the counter is persisted only after TUF agrees
    assert env.apply(env.assign("digits@2.0.0")).outcome is Outcome.COMMITTED  # its counter (2) is below 50


def test_a_counter_jump_that_would_freeze_the_device_is_refused(env: Env) -> None:
    before = env.ctx.store.load().highest_counter
    assert_refused(env, env.apply(_forged(env, 2**64 - 1)), "assignment_counter_jump")
    assert env.ctx.store.load().highest_counter == before
    assert env.apply(env.assign("digits@2.0.0")).outcome is Outcome.COMMITTED


def test_metadata_that_is_not_tuf_metadata_is_refused(env: Env) -> None:
    (env.meta / "timestamp.json").write_bytes(b'{"signed": "not a timestamp"}')
    assert_refused(env, env.apply(env.assign("digits@2.0.0")), "metadata_invalid")


def test_unusable_trusted_director_keys_are_refused_as_trust_invalid(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()
    with pytest.raises(AssignmentError) as wrong_id:
        load_director_keys({"0" * 64: key})  # the id does not name this key
    with pytest.raises(AssignmentError) as no_keys:
        load_director_keys({})
    with pytest.raises(AgentError) as no_root:
        StateStore(tmp_path / "agent").seed_trust_root(tmp_path / "missing-root.json")
    assert {wrong_id.value.reason, no_keys.value.reason, no_root.value.reason} == {"trust_invalid"}


def _past() -> datetime:
    return datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def test_freeze_expired_timestamp(env: Env) -> None:
    ts = Metadata.from_file(str(env.meta / "timestamp.json"))
    ts.signed.version += 1
    ts.signed.expires = _past()
    env.write(ts, "timestamp.json", [env.signer("timestamp")])
    assert_refused(env, env.apply(env.assign("digits@2.0.0")), "metadata_expired")


def test_freeze_expired_targets(env: Env) -> None:
    n = env.latest("targets")
    targets = Metadata.from_file(str(env.meta / f"{n}.targets.json"))
    targets.signed.version = n + 1
    targets.signed.expires = _past()
    env.write(targets, f"{n + 1}.targets.json", [env.signer("targets")])
    env.serve_targets_version(n + 1)
    assert_refused(env, env.apply(env.assign("digits@2.0.0")), "metadata_expired")


def test_a_timestamp_version_rollback_is_refused(env: Env) -> None:
    """A validly signed, unexpired timestamp older than the one the device already trusts."""
    ts = Metadata.from_file(str(env.meta / "timestamp.json"))
    trusted = ts.signed.version
    assert trusted >= 2
    ts.signed.version = trusted - 1
    env.write(ts, "timestamp.json", [env.signer("timestamp")])
    assert_refused(env, env.apply(env.assign("digits@2.0.0")), "metadata_mismatch")


def test_a_snapshot_version_rollback_is_refused(env: Env) -> None:
    """A new, validly signed timestamp that names a snapshot older than the one the device already trusts."""
    s = env.latest("snapshot")
    assert (env.meta / f"{s - 1}.snapshot.json").exists()
    ts = Metadata.from_file(str(env.meta / "timestamp.json"))
    ts.signed.version += 1
    ts.signed.snapshot_meta = MetaFile(version=s - 1)
    env.write(ts, "timestamp.json", [env.signer("timestamp")])
    assert_refused(env, env.apply(env.assign("digits@2.0.0")), "metadata_mismatch")


def test_mix_and_match_snapshot_and_targets(env: Env) -> None:
    """Serve an older (validly signed) targets file where the snapshot names the current version."""
    n = env.latest("targets")  # the device already trusts targets n: name n + 1, serve n - 1's content
    (env.meta / f"{n + 1}.targets.json").write_bytes((env.meta / f"{n - 1}.targets.json").read_bytes())
    env.serve_targets_version(n + 1)
    assert_refused(env, env.apply(env.assign("digits@2.0.0")), "metadata_mismatch")


def test_root_rotation_not_signed_by_the_old_root(env: Env) -> None:
    root: Metadata[Root] = Metadata.from_file(str(env.meta / "1.root.json"))
    new_key = CryptoSigner.generate_ed25519()
    for keyid in list(root.signed.roles["root"].keyids):
        root.signed.revoke_key(keyid, "root")
    root.signed.add_key(new_key.public_key, "root")
    root.signed.version = 2
    env.write(root, "2.root.json", [new_key])  # signed by the new key only
    assert_refused(env, env.apply(env.assign("digits@2.0.0")), "root_rotation_invalid")


def test_valid_root_rotation_is_followed(env: Env) -> None:
    for _ in range(2):
        env.d.repository().rotate_root()
    result = env.apply(env.assign("digits@2.0.0"))
    assert result.outcome is Outcome.COMMITTED, result
    cached = Metadata.from_file(str(env.ctx.store.tuf_dir / "root.json"))
    assert cached.signed.version == 3


def test_online_keys_rotated_with_the_root_are_followed_and_the_replaced_ones_refused(env: Env) -> None:
    assert env.d.repository().rotate_root(("root", "targets", "snapshot", "timestamp")) == 2
    assert sorted(p.name for p in (env.d.keys / "retired").iterdir()) == [
        f"{role}-v1.pem" for role in ("root", "snapshot", "targets", "timestamp")
    ]
    assert env.apply(env.assign("digits@2.0.0")).outcome is Outcome.COMMITTED

    # A timestamp signed with the replaced key (whoever copied the coordinator's disk before) is refused.
    old_timestamp_key = CryptoSigner(load_private_key(env.d.keys / "retired" / "timestamp-v1.pem"))
    ts = Metadata.from_file(str(env.meta / "timestamp.json"))
    ts.signed.version += 1
    env.write(ts, "timestamp.json", [old_timestamp_key])
    result = env.apply(env.assign("digits@1.0.0"))
    assert result.outcome is Outcome.REJECTED and result.reason == "metadata_bad_signature", result
    assert env.active_sha() == env.sha["2.0.0"]


def test_a_role_with_a_threshold_above_one_needs_that_many_signatures(env: Env) -> None:
    """A (validly rotated) root asks for two timestamp signatures: one alone is refused, two are accepted."""
    n = env.latest("root")
    root: Metadata[Root] = Metadata.from_file(str(env.meta / f"{n}.root.json"))
    second = CryptoSigner.generate_ed25519()
    root.signed.add_key(second.public_key, "timestamp")
    root.signed.roles["timestamp"].threshold = 2
    root.signed.version = n + 1
    env.write(root, f"{n + 1}.root.json", [env.signer("root")])
    ts = Metadata.from_file(str(env.meta / "timestamp.json"))
    ts.signed.version += 1
    env.write(ts, "timestamp.json", [env.signer("timestamp")])  # the usual key alone: one of two
    assert_refused(env, env.apply(env.assign("digits@2.0.0")), "metadata_bad_signature")
    env.write(ts, "timestamp.json", [env.signer("timestamp"), second])  # the control: both keys
    result = env.apply(env.assign("digits@2.0.0"))
    assert result.outcome is Outcome.COMMITTED, result
    assert env.active_sha() == env.sha["2.0.0"]


def test_an_unchanged_root_is_not_written_again_but_a_rotated_one_is(env: Env) -> None:
    tuf_dir = env.ctx.store.tuf_dir

    def cached_root() -> tuple[str, int, int]:
        """Where root.json links, the link's inode and its target's inode (a rewrite makes new inodes)."""
        link = tuf_dir / "root.json"
        return os.readlink(link), link.lstat().st_ino, link.stat().st_ino

    before = cached_root()
    assert before[0] == "root_history/1.root.json"
    assert env.apply(env.assign("digits@2.0.0")).outcome is Outcome.COMMITTED
    assert cached_root() == before  # ngclient alone unlinks and re-creates both at every refresh

    env.d.repository().rotate_root()
    assert env.apply(env.assign("digits@1.0.0")).outcome is Outcome.COMMITTED
    after = cached_root()
    assert after[0] == "root_history/2.root.json" and after[1:] != before[1:]
    rotated: Metadata[Root] = Metadata.from_file(str(tuf_dir / "root.json"))
    assert rotated.signed.version == 2
    assert (tuf_dir / "root_history" / "1.root.json").read_bytes() == (env.meta / "1.root.json").read_bytes()


def test_each_release_is_in_a_role_of_its_own_and_an_update_loads_only_its_own(env: Env) -> None:
    targets = Metadata.from_file(str(env.meta / f"{env.latest('targets')}.targets.json")).signed
    assert not [p for p in targets.targets if p.startswith("digits/")]  # only fedfleet's own files stay on top
    roles = {release_role(f"digits/{v}/model.tflite") for v in ("1.0.0", "2.0.0")}
    assert targets.delegations is not None and set(targets.delegations.roles or {}) == roles
    cached = {p.name for p in env.ctx.store.tuf_dir.glob("r-*.json")}
    assert cached == {f"{env.release_role('1.0.0')[0]}.json"}  # the fixture's update to 1.0.0: not 2.0.0's role


def test_a_release_role_signed_by_another_key_is_refused(env: Env) -> None:
    role, md = env.release_role("2.0.0")
    md.signed.version += 1
    env.write(md, f"{md.signed.version}.{role}.json", [CryptoSigner.generate_ed25519()])
    env.serve_role_version(role, md.signed.version)
    assert_refused(env, env.apply(env.assign("digits@2.0.0")), "metadata_bad_signature")


def test_an_expired_release_role_is_refused(env: Env) -> None:
    role, md = env.release_role("2.0.0")
    md.signed.version += 1
    md.signed.expires = _past()
    env.write(md, f"{md.signed.version}.{role}.json", [env.signer("releases")])
    env.serve_role_version(role, md.signed.version)
    assert_refused(env, env.apply(env.assign("digits@2.0.0")), "metadata_expired")


def test_a_rotated_releases_key_is_followed_and_a_role_signed_by_the_retired_key_refused(env: Env) -> None:
    old = env.signer("releases")
    _, cached = env.release_role("1.0.0")  # the version the agent verified and cached in the fixture
    assert env.d.repository().rotate_releases_key() == 2
    new = env.signer("releases")
    assert new.public_key.keyid != old.public_key.keyid
    assert [p.name for p in (env.d.keys / "retired").glob("releases-*.pem")]
    targets = Metadata.from_file(str(env.meta / f"{env.latest('targets')}.targets.json")).signed
    assert targets.delegations is not None and set(targets.delegations.keys) == {new.public_key.keyid}
    assert {r.keyids[0] for r in (targets.delegations.roles or {}).values()} == {new.public_key.keyid}

    # The agent follows: 2.0.0's role and 1.0.0's (cached under the old key) verify with the new key.
    assert env.apply(env.assign("digits@2.0.0")).outcome is Outcome.COMMITTED
    assert env.apply(env.assign("digits@1.0.0")).outcome is Outcome.COMMITTED
    assert env.release_role("1.0.0")[1].signed.version == cached.signed.version + 1

    # Whoever still holds the retired key can no longer sign a release.
    role, md = env.release_role("2.0.0")
    md.signed.version += 1
    env.write(md, f"{md.signed.version}.{role}.json", [old])
    env.serve_role_version(role, md.signed.version)
    result = env.apply(env.assign("digits@2.0.0"))
    assert result.outcome is Outcome.REJECTED and result.reason == "metadata_bad_signature", result
    assert env.active_sha() == env.sha["1.0.0"]


def test_rotating_the_releases_key_of_a_repository_without_releases_re_signs_nothing(tmp_path: Path) -> None:
    d, _ = DataDir.init(tmp_path / "data")
    repository = d.repository()
    snapshot = repository.timestamp_version()
    assert repository.rotate_releases_key() == 0
    assert (d.keys / "releases.pem").is_file() and repository.timestamp_version() == snapshot
    key = (d.keys / "releases.pem").read_bytes()
    assert repository.rotate_releases_key() == 0  # again: the first new key is retired, not overwritten
    assert (d.keys / "retired" / "releases-1.pem").read_bytes() == key


def test_a_release_role_of_another_version_than_the_snapshot_names_is_refused(env: Env) -> None:
    role, md = env.release_role("2.0.0")
    n = md.signed.version
    (env.meta / f"{n + 1}.{role}.json").write_bytes((env.meta / f"{n}.{role}.json").read_bytes())  # still says n
    env.serve_role_version(role, n + 1)
    assert_refused(env, env.apply(env.assign("digits@2.0.0")), "metadata_mismatch")


def test_many_releases_keep_what_an_update_verifies_small(env: Env) -> None:
    """150 releases whose custom metadata (like a drift reference) add up past what an agent accepts in one
    metadata file: in one targets role no device could update any more; with a role each, an update reads a
    targets file of about 200 bytes per release and its own role."""
    repo = env.d.repository()
    bulk = {"drift_reference": {"b64": "A" * 16_000}}
    for i in range(150):
        repo.add_target(f"old/{i}/model.tflite", str(i).encode(), bulk, delegate=True)
    assert 150 * len(json.dumps(bulk)) > LIMITS.metadata_file
    result = env.apply(env.assign("digits@2.0.0"))
    assert result.outcome is Outcome.COMMITTED, result
    sizes = {p.name: p.stat().st_size for p in env.ctx.store.tuf_dir.glob("*.json") if not p.is_symlink()}
    assert sizes["targets.json"] < 150 * 400, sizes  # delegations only
    assert max(sizes.values()) < 64 * 1024, sizes


def test_metadata_larger_than_the_cap_is_refused(env: Env) -> None:
    """Endless data on the metadata side: a targets file past the agent's cap, in the bundle or by name."""
    n = env.latest("targets")
    (env.meta / f"{n + 1}.targets.json").write_bytes(b" " * (LIMITS.metadata_file + 1))
    env.serve_targets_version(n + 1)
    assert_refused(env, env.apply(env.assign("digits@2.0.0")), "metadata_too_large")


class CountingTransport(GrpcTransport):
    """The real transport, counting the calls an update makes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: Counter[str] = Counter()

    def fetch(self, kind: Literal["metadata", "target"], path: str, offset: int = 0) -> Iterator[pb.Chunk]:
        self.calls[kind] += 1
        return super().fetch(kind, path, offset)

    def fetch_metadata_bundle(self, root_version: int, target_path: str = "") -> Iterator[pb.MetadataPart]:
        self.calls["bundle"] += 1
        return super().fetch_metadata_bundle(root_version, target_path)


class CoordinatorWithoutBundles(FleetService):
    """An older coordinator: no FetchMetadataBundle."""

    async def FetchMetadataBundle(self, request: Any, context: Any) -> AsyncIterator[pb.MetadataPart]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        yield pb.MetadataPart()


class CoordinatorWithBrokenBundles(FleetService):
    """A bundle whose second chunk skips bytes: the agent must not use any of it."""

    async def FetchMetadataBundle(self, request: Any, context: Any) -> AsyncIterator[pb.MetadataPart]:
        async for part in super().FetchMetadataBundle(request, context):
            if part.name == "timestamp.json":
                part.offset += 1
            yield part


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        (FleetService, {"bundle": 1, "target": 1}),  # root, timestamp, snapshot, targets, the role: one stream
        (CoordinatorWithoutBundles, {"bundle": 1, "metadata": 5, "target": 1}),
        (CoordinatorWithBrokenBundles, {"bundle": 1, "metadata": 5, "target": 1}),
    ],
    ids=["bundle", "older-coordinator", "broken-bundle"],
)
def test_an_update_fetches_its_metadata_in_one_call_or_file_by_file(
    datadir: DataDir,
    model_bytes: dict[str, bytes],
    tmp_path: Path,
    service: type[FleetService],
    expected: dict[str, int],
) -> None:
    store = datadir.store()
    store.register_device(DEVICE, "lab", {}, {}, "test")
    publish_release(datadir.repository(), store, model_bytes["1.0.0"], "digits", "1.0.0")
    server = GrpcServerThread(store, datadir.repository(), service_class=service)
    state = StateStore(tmp_path / "agent")
    state.seed_trust_root(datadir.trust / "root.json")
    transport = CountingTransport(server.address, DEVICE, timeout=10)
    keys = load_director_keys(json.loads((datadir.trust / "director_keys.json").read_text()))
    try:
        datadir.director().assign(store, [DEVICE], store.release("digits@1.0.0"))
        row = store.current_assignment(DEVICE)
        assert row is not None
        result = apply_assignment(row["signed"], UpdateContext(DEVICE, state, transport, keys, lambda e: None))
        assert result.outcome is Outcome.COMMITTED, result
        assert dict(transport.calls) == expected
        active = state.load().active_info
        assert active is not None and active.release_id == "digits@1.0.0"
    finally:
        transport.close()
        server.stop()
        store.close()


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda b: b"\x00garbage",
        lambda b: b[: len(b) // 2],
        lambda b: b"",
        lambda b: b"x" * 20_000,
    ],
)
def test_malformed_assignment_payloads(env: Env, corrupt: Callable[[bytes], bytes]) -> None:
    result = env.apply(corrupt(env.assign("digits@2.0.0")))
    assert result.outcome is Outcome.REJECTED
    assert result.reason.startswith("assignment_")
    assert env.active_sha() == env.sha["1.0.0"]


# ----- freshness: the director's "your latest assignment is counter N" -----


def test_an_assignment_superseded_by_the_directors_statement_is_refused_and_the_newer_one_offered(env: Env) -> None:
    offered: list[bytes] = []
    env.ctx.offer = offered.append
    superseded = env.assign("digits@2.0.0")  # counter 2, never delivered
    rollback = env.assign("digits@1.0.0")  # counter 3: the operator rolled back

    assert_refused(env, env.apply(superseded), "assignment_superseded")

    state = env.ctx.store.load()
    assert (state.highest_counter, state.fresh_counter) == (1, 3)  # nothing burned; the statement kept
    assert not [e for e in env.events if e.counter == 2 and e.kind == pb.EVENT_KIND_DOWNLOADING]
    assert offered == [rollback]  # the check's answer carried the newer assignment
    result = env.apply(offered[0])
    assert (result.outcome, result.reason) == (Outcome.COMMITTED, "already_running")
    assert env.ctx.store.load().committed_counter == 3


def test_a_held_statement_refuses_a_superseded_assignment_without_asking(env: Env) -> None:
    superseded = env.assign("digits@2.0.0")
    env.assign("digits@1.0.0")
    statement = env.ctx.transport.check(1).freshness
    assert accept_freshness(env.ctx, statement) is not None
    live = env.ctx.transport
    env.ctx.transport = GrpcTransport("127.0.0.1:1", DEVICE, timeout=2)  # nothing listens: no network at all
    try:
        assert_refused(env, env.apply(superseded), "assignment_superseded")
    finally:
        env.ctx.transport.close()
        env.ctx.transport = live


def test_an_assignment_the_director_does_not_state_is_refused_without_burning_its_counter(env: Env) -> None:
    """Signed with the director's key but never issued (a stolen key, or a restored old database)."""
    assert_refused(env, env.apply(_forged(env, 5)), "assignment_unconfirmed")
    assert env.ctx.store.load().highest_counter == 1
    assert not [e for e in env.events if e.counter == 5 and e.kind == pb.EVENT_KIND_DOWNLOADING]
    assert env.apply(env.assign("digits@2.0.0")).outcome is Outcome.COMMITTED  # counter 2: not blocked


class CoordinatorWithoutCheck(FleetService):
    """An older coordinator, or an attacker who drops the check: no freshness statement can be had."""

    async def Check(self, request: Any, context: Any) -> pb.CheckResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        return pb.CheckResponse()


def test_an_assignment_that_cannot_be_confirmed_waits_and_downloads_nothing(env: Env) -> None:
    store = env.d.store()
    blocked = GrpcServerThread(store, env.d.repository(), service_class=CoordinatorWithoutCheck)
    live = env.ctx.transport
    env.ctx.transport = GrpcTransport(blocked.address, DEVICE, timeout=10)
    try:
        payload = env.assign("digits@2.0.0")
        result = env.apply(payload)
        assert result.outcome is Outcome.RETRY and result.reason == "transient", result
        state = env.ctx.store.load()
        assert (state.highest_counter, state.pending) == (1, None)  # not accepted: checked before persisting
        assert not [e for e in env.events if e.counter == 2 and e.kind == pb.EVENT_KIND_DOWNLOADING]
        assert env.active_sha() == env.sha["1.0.0"]
    finally:
        env.ctx.transport.close()
        env.ctx.transport = live
        blocked.stop()
        store.close()
    assert env.apply(payload).outcome is Outcome.COMMITTED  # the same assignment, once the director answers
    assert env.active_sha() == env.sha["2.0.0"]


def test_freshness_statements_only_move_forward_and_must_be_the_directors(env: Env) -> None:
    director = env.d.director()
    held = env.ctx.transport.check(1).freshness  # counter 1, already held since the fixture's update
    env.assign("digits@2.0.0")
    newer = env.ctx.transport.check(1).freshness
    kept = accept_freshness(env.ctx, newer)
    assert kept is not None and kept.counter == 2
    before = env.ctx.store.load()

    assert accept_freshness(env.ctx, held) is None  # a replayed older statement changes nothing
    now = int(time.time() * 1000)
    short = Director(load_private_key(env.d.keys / "director.pem"), freshness_seconds=1.0)
    assert accept_freshness(env.ctx, short.sign_freshness(DEVICE, 7, now - 5000)) is None  # expired: ignored
    assert env.ctx.store.load() == before

    assignment = pb.SignedAssignment.FromString(env.assign("digits@1.0.0"))
    as_statement = pb.SignedFreshness(
        freshness=assignment.assignment, key_id=assignment.key_id, signature=assignment.signature
    )
    for bad, reason in [
        (director.sign_freshness("dev-2", 9, now), "freshness_invalid"),  # another device's
        (as_statement, "freshness_invalid"),  # an assignment's signature never passes for a statement's
        (Director(Ed25519PrivateKey.generate()).sign_freshness(DEVICE, 9, now), "freshness_invalid"),  # not ours
        (director.sign_freshness(DEVICE, 2**63, now), "assignment_counter_jump"),  # would supersede everything
    ]:
        with pytest.raises(AssignmentError) as refused:
            accept_freshness(env.ctx, bad)
        assert refused.value.reason == reason
    state = env.ctx.store.load()
    assert (state.fresh_counter, state.fresh_issued_ms) == (before.fresh_counter, before.fresh_issued_ms)


def test_a_device_is_stale_without_an_unexpired_statement() -> None:
    assert AgentState().is_stale(1)
    assert not AgentState(fresh_until_ms=1001).is_stale(1000)
    assert AgentState(fresh_until_ms=1000).is_stale(1000)


def test_a_statement_from_mqtt_with_an_unknown_key_costs_no_metadata_refresh(env: Env) -> None:
    """Anyone may publish on the freshness topic of a plaintext broker; only a statement that came over gRPC may
    send the agent to fetch a rotated director key list."""
    rogue = Director(Ed25519PrivateKey.generate()).sign_freshness(DEVICE, 9, int(time.time() * 1000))
    live = env.ctx.transport
    counting = CountingTransport(env.server.address, DEVICE, timeout=10)
    env.ctx.transport = counting
    try:
        for learn_keys in (False, True):
            with pytest.raises(AssignmentError) as refused:
                accept_freshness(env.ctx, rogue, learn_keys=learn_keys)
            assert refused.value.reason == "freshness_invalid"
            assert (sum(counting.calls.values()) > 0) is learn_keys, counting.calls
    finally:
        counting.close()
        env.ctx.transport = live
