"""The coordinator's TUF repository: root, targets, snapshot and timestamp, Ed25519, consistent snapshots.

Files (served to devices by name through gRPC FetchMetadata / FetchTarget):

    repository/metadata/1.root.json, 2.root.json, ...   every root version, for clients that rotate through them
    repository/metadata/N.targets.json, N.snapshot.json  consistent snapshots: never overwritten
    repository/metadata/N.r-<hash>.json                  one delegated targets role per release (see below)
    repository/metadata/timestamp.json                   the only file that changes in place
    repository/targets/<dir>/<sha256>.<basename>          target bytes, content-addressed
    keys/<role>.pem                                      private keys (0600); keys/retired/ after a rotation
    OFFLINE/root.pem                                     the root key, with `fedfleet init --offline-keys OFFLINE`

Every writer holds an exclusive lock on repository/.lock, so `fedfleet release` and the timestamp refresh in
`fedfleet serve` never interleave.

Releases are not listed in the top-level targets role but each in a role of its own, delegated by targets (one
online key, keys/releases.pem; the role's only path is the release's target). A release carries its drift
reference, probe set and model card in its custom metadata (about 17 KB); in one targets file every update
would download and verify all of them, and past about 120 releases that file would outgrow what agents accept
(LIMITS.metadata_file). With a role each, an agent loads targets (about 200 bytes per release) and the
one role its assignment names. fedfleet's own files (the director keys) stay in the top-level role, and so do
releases published before this layout.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from edge_agent.contract.files import atomic_write_bytes
from server.errors import ConflictError, DataDirError
from server.trust.keyfile import OfflineKeyError, read_key, write_key

logger = logging.getLogger(__name__)

__all__ = ["RELEASES_KEY", "Expiry", "Repository", "load_private_key", "release_role", "write_private_key"]

_SERIALIZER = JSONSerializer(compact=False)
_META_NAME = re.compile(r"^(timestamp|(\d{1,10})\.(root|snapshot|targets|r-[0-9a-f]{16}))\.json$")
RELEASES_KEY = "releases"  # keys/releases.pem signs every release's delegated role
_TARGET_NAME = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
TOP_LEVEL = (Root.type, Targets.type, Snapshot.type, Timestamp.type)


@dataclass(frozen=True)
class Expiry:
    """How long each role's signature is valid. Online roles are re-signed by `fedfleet serve`."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)

    def of(self, role: str) -> timedelta:
        value: timedelta = getattr(self, role)
        return value


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """0600, atomic; encrypted when a key passphrase is set (server/trust/keyfile.py)."""
    write_key(path, key)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 key, plain or encrypted (then with the passphrase from the environment)."""
    key = read_key(path)
    if not isinstance(key, Ed25519PrivateKey):
        raise DataDirError(f"key {path} is not an Ed25519 private key")
    return key


def release_role(target_path: str) -> str:
    """The name of the delegated role that holds a release's target (file-name safe, fixed length)."""
    return "r-" + hashlib.sha256(target_path.encode()).hexdigest()[:16]


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class Repository:
    def __init__(self, repo_dir: Path, keys_dir: Path, expiry: Expiry | None = None) -> None:
        self.dir = repo_dir
        self.metadata_dir = repo_dir / "metadata"
        self.targets_dir = repo_dir / "targets"
        self.keys_dir = keys_dir
        self.expiry = expiry or Expiry()
        self._role_expiry: dict[tuple[str, int], datetime] = {}  # (release role, version) -> its expiry

    # ----- creation -----

    @classmethod
    def create(
        cls, repo_dir: Path, keys_dir: Path, expiry: Expiry | None = None, root_key_dir: Path | None = None
    ) -> Repository:
        """A new repository; the root key goes to root_key_dir (offline) when given, else to keys_dir."""
        repo = cls(repo_dir, keys_dir, expiry)
        repo.metadata_dir.mkdir(parents=True, exist_ok=True)
        repo.targets_dir.mkdir(parents=True, exist_ok=True)
        with repo._lock():
            signers = {}
            for role in TOP_LEVEL:
                key = Ed25519PrivateKey.generate()
                directory = root_key_dir if role == Root.type and root_key_dir is not None else keys_dir
                write_private_key(directory / f"{role}.pem", key)
                signers[role] = CryptoSigner(key)
            root = Root(expires=_now() + repo.expiry.root, consistent_snapshot=True)
            for role, signer in signers.items():
                root.add_key(signer.public_key, role)
            repo._write(Metadata(root), [signers[Root.type]])
            repo._write(Metadata(Targets(expires=_now() + repo.expiry.targets)), [signers[Targets.type]])
            repo._write_snapshot_and_timestamp()
        return repo

    # ----- reading -----

    def _load(self, role: str, version: int | None = None) -> Metadata[Any]:
        if role == Timestamp.type:
            path = self.metadata_dir / "timestamp.json"
        else:
            if version is None:
                version = self._latest_version(role)
            path = self.metadata_dir / f"{version}.{role}.json"
        if not path.is_file():
            raise DataDirError(f"repository metadata {path} is missing; run `fedfleet init`")
        try:
            return Metadata.from_bytes(path.read_bytes())
        except (OSError, DeserializationError) as e:
            raise DataDirError(f"repository metadata {path} is unreadable: {e}") from e

    def _latest_version(self, role: str) -> int:
        versions = [int(p.name.split(".", 1)[0]) for p in self.metadata_dir.glob(f"*.{role}.json")]
        if not versions:
            raise DataDirError(f"no {role} metadata in {self.metadata_dir}; run `fedfleet init`")
        return max(versions)

    def root_bytes(self) -> bytes:
        return (self.metadata_dir / f"{self._latest_version(Root.type)}.root.json").read_bytes()

    def first_root_bytes(self) -> bytes:
        return (self.metadata_dir / "1.root.json").read_bytes()

    def timestamp_version(self) -> int:
        ts: Timestamp = self._load(Timestamp.type).signed
        return ts.version

    def refresh_files(
        self, after_root: int, max_roots: int = 32, target_path: str = ""
    ) -> tuple[list[tuple[str, bytes]], int]:
        """What a client trusting root `after_root` fetches in one refresh, as (name, bytes) in TUF's order:
        the next root versions (at most `max_roots`), timestamp.json, the snapshot it names, the targets that
        snapshot names, and with a `target_path` the role the snapshot names for that release (if there is
        one); and the newest root version. Read fresh on every call (timestamp.json changes in place);
        consistent snapshots are never overwritten, so the files always belong together. Nothing here is
        trusted by the client: it verifies each file as if fetched by name."""
        files: list[tuple[str, bytes]] = []
        version = after_root + 1
        while len(files) < max_roots and (path := self.metadata_dir / f"{version}.root.json").is_file():
            files.append((path.name, path.read_bytes()))
            version += 1
        known = files or (self.metadata_dir / f"{after_root}.root.json").is_file()
        # Capped, or the client names a root we do not have: look the newest up.
        newest = version - 1 if known and len(files) < max_roots else self._latest_version(Root.type)
        timestamp = (self.metadata_dir / "timestamp.json").read_bytes()
        files.append(("timestamp.json", timestamp))
        try:
            snapshot_name = f"{int(json.loads(timestamp)['signed']['meta']['snapshot.json']['version'])}.snapshot.json"
            snapshot = (self.metadata_dir / snapshot_name).read_bytes()
            files.append((snapshot_name, snapshot))
            meta = json.loads(snapshot)["signed"]["meta"]
            targets_name = f"{int(meta['targets.json']['version'])}.targets.json"
            files.append((targets_name, (self.metadata_dir / targets_name).read_bytes()))
            role = release_role(target_path) if target_path else None
            if role is not None and f"{role}.json" in meta:
                role_name = f"{int(meta[f'{role}.json']['version'])}.{role}.json"
                files.append((role_name, (self.metadata_dir / role_name).read_bytes()))
        except (ValueError, KeyError, TypeError, OSError) as e:  # the client fetches what is missing by name
            logger.warning("metadata bundle cut short after %s: %s", files[-1][0], e)
        return files, newest

    def metadata_path(self, name: str) -> Path | None:
        """The file behind a metadata name a client may ask for, or None if the name is not one."""
        if not _META_NAME.match(name):
            return None
        path = self.metadata_dir / name
        return path if path.is_file() else None

    def target_path(self, name: str) -> Path | None:
        if not _TARGET_NAME.match(name) or ".." in name.split("/"):
            return None
        path = self.targets_dir / name
        return path if path.is_file() else None

    # ----- writing -----

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _signer(self, role: str) -> CryptoSigner:
        return CryptoSigner(load_private_key(self.keys_dir / f"{role}.pem"))

    def _write(self, md: Metadata[Any], signers: list[CryptoSigner], role: str | None = None) -> None:
        """Sign and write; `role` names a delegated role (its type is "targets" too)."""
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        role = role or md.signed.type
        name = "timestamp.json" if role == Timestamp.type else f"{md.signed.version}.{role}.json"
        atomic_write_bytes(self.metadata_dir / name, md.to_bytes(_SERIALIZER))

    def _releases_signer(self) -> CryptoSigner:
        """The online key of the releases' delegated roles, made on first use (data dirs from before it too)."""
        path = self.keys_dir / f"{RELEASES_KEY}.pem"
        if not path.exists():
            write_private_key(path, Ed25519PrivateKey.generate())
        return self._signer(RELEASES_KEY)

    def _bump(self, signed: Signed) -> None:
        signed.version += 1
        signed.expires = _now() + self.expiry.of(signed.type)

    def _write_snapshot_and_timestamp(self, roles: dict[str, int] | None = None, removed: tuple[str, ...] = ()) -> None:
        """New snapshot over the latest targets and the delegated roles' versions (those in `roles` changed, those
        in `removed` are gone, the others are as the previous snapshot has them), new timestamp over that
        snapshot."""
        targets_version = self._latest_version(Targets.type)
        try:
            snapshot: Metadata[Snapshot] = self._load(Snapshot.type)
            self._bump(snapshot.signed)
        except DataDirError:
            snapshot = Metadata(Snapshot(expires=_now() + self.expiry.snapshot))
        snapshot.signed.meta["targets.json"] = MetaFile(version=targets_version)
        for role, version in (roles or {}).items():
            snapshot.signed.meta[f"{role}.json"] = MetaFile(version=version)
        for role in removed:
            snapshot.signed.meta.pop(f"{role}.json", None)
        self._write(snapshot, [self._signer(Snapshot.type)])
        try:
            timestamp: Metadata[Timestamp] = self._load(Timestamp.type)
            self._bump(timestamp.signed)
        except DataDirError:
            timestamp = Metadata(Timestamp(expires=_now() + self.expiry.timestamp))
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        self._write(timestamp, [self._signer(Timestamp.type)])

    def add_target(
        self, target_path: str, data: bytes, custom: dict[str, Any], replace: bool = False, delegate: bool = False
    ) -> TargetFile:
        """Publish bytes as a target: in the top-level targets role, or with `delegate` in a role of its own (a
        release). Re-adding identical bytes and metadata changes nothing, wherever the target is; other bytes
        under the same path are refused unless `replace` (for fedfleet's own files, such as the director keys)."""
        if not _TARGET_NAME.match(target_path):
            raise ConflictError(f"target path {target_path!r} may hold only letters, digits, '.', '_', '-', '/'")
        with self._lock():
            targets: Metadata[Targets] = self._load(Targets.type)
            new = TargetFile.from_data(target_path, data, ["sha256"])
            new.unrecognized_fields["custom"] = custom
            role = release_role(target_path)
            delegations = targets.signed.delegations
            delegated = delegations is not None and role in (delegations.roles or {})
            role_version = self._load(Snapshot.type).signed.meta[f"{role}.json"].version if delegated else 0
            existing = targets.signed.targets.get(target_path)
            if existing is None and role_version:
                existing = self._load(role, role_version).signed.targets.get(target_path)
            if existing is not None:
                if existing.hashes == new.hashes and existing.custom == custom:
                    return existing
                if not replace:
                    raise ConflictError(f"target {target_path} already exists with other bytes or metadata")
            directory, sep, base = target_path.rpartition("/")
            stored = self.targets_dir / f"{directory}{sep}{new.hashes['sha256']}.{base}"
            stored.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(stored, data)
            if not delegate or target_path in targets.signed.targets:
                targets.signed.targets[target_path] = new
                self._bump(targets.signed)
                self._write(targets, [self._signer(Targets.type)])
                self._write_snapshot_and_timestamp()
                return new
            signer = self._releases_signer()
            if not role_version:  # a new release: targets delegates its path to a new role
                if delegations is None or delegations.roles is None:
                    delegations = targets.signed.delegations = Delegations(keys={}, roles={})
                assert delegations.roles is not None
                delegations.keys[signer.public_key.keyid] = signer.public_key
                delegations.roles[role] = DelegatedRole(role, [signer.public_key.keyid], 1, True, [target_path])
                self._bump(targets.signed)
                self._write(targets, [self._signer(Targets.type)])
            version = role_version + 1
            release = Targets(version=version, expires=_now() + self.expiry.targets, targets={target_path: new})
            self._write(Metadata(release), [signer], role)
            self._write_snapshot_and_timestamp({role: version})
            return new

    def remove_target(self, target_path: str) -> list[Path]:
        """Take a release's target out of the repository: targets no longer delegates its role (or, for a target
        of the top-level role, no longer lists it), a new snapshot no longer names the role, a new timestamp names
        that snapshot, all signed as usual; then the role's metadata files and the target's bytes are deleted.
        Returns the files deleted. A target the repository does not hold changes nothing (an interrupted removal
        is finished by the next: the metadata goes first, the files after)."""
        with self._lock():
            targets: Metadata[Targets] = self._load(Targets.type)
            role = release_role(target_path)
            delegations = targets.signed.delegations
            roles = delegations.roles if delegations is not None else None
            info: TargetFile | None = None
            removed_roles: tuple[str, ...] = ()
            if roles is not None and role in roles:
                meta = self._load(Snapshot.type).signed.meta.get(f"{role}.json")
                if meta is not None:
                    info = self._load(role, meta.version).signed.targets.get(target_path)
                del roles[role]
                if not roles:  # no release left: targets delegates nothing
                    targets.signed.delegations = None
                removed_roles = (role,)
            elif target_path in targets.signed.targets:
                info = targets.signed.targets.pop(target_path)
            if removed_roles or info is not None:
                self._bump(targets.signed)
                self._write(targets, [self._signer(Targets.type)])
                self._write_snapshot_and_timestamp(removed=removed_roles)
            deleted = sorted(self.metadata_dir.glob(f"*.{role}.json"))
            directory, sep, base = target_path.rpartition("/")
            if info is not None:
                deleted.append(self.targets_dir / f"{directory}{sep}{info.hashes['sha256']}.{base}")
            else:  # finishing an interrupted removal: whatever bytes are left under the path
                deleted += list((self.targets_dir / directory).glob(f"*.{base}")) if directory else []
            gone = []
            for path in deleted:
                if path.is_file():
                    path.unlink()
                    gone.append(path)
            self._role_expiry = {k: v for k, v in self._role_expiry.items() if k[0] != role}
            parent = (self.targets_dir / directory) if directory else None
            while parent is not None and parent != self.targets_dir and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
            return gone

    def holds_target(self, target_path: str) -> bool:
        """Whether targets lists the target or delegates its release role."""
        targets: Targets = self._load(Targets.type).signed
        roles = targets.delegations.roles if targets.delegations is not None else None
        return target_path in targets.targets or (roles is not None and release_role(target_path) in roles)

    def refresh_expiring(self, now: datetime | None = None) -> list[str]:
        """Re-sign online roles that are past half their validity; returns the roles re-signed."""
        now = now or _now()
        renewed: list[str] = []
        with self._lock():
            targets: Metadata[Targets] = self._load(Targets.type)
            if targets.signed.expires - now < self.expiry.targets / 2:
                self._bump(targets.signed)
                self._write(targets, [self._signer(Targets.type)])
                renewed.append(Targets.type)
            roles = self._renew_release_roles(targets.signed, now)
            if roles:
                renewed.append(f"{len(roles)} release role(s)")
            snapshot: Snapshot = self._load(Snapshot.type).signed
            timestamp: Timestamp = self._load(Timestamp.type).signed
            if renewed or snapshot.expires - now < self.expiry.snapshot / 2:
                self._write_snapshot_and_timestamp(roles)
                renewed += [Snapshot.type, Timestamp.type]
            elif timestamp.expires - now < self.expiry.timestamp / 2:
                ts: Metadata[Timestamp] = self._load(Timestamp.type)
                self._bump(ts.signed)
                self._write(ts, [self._signer(Timestamp.type)])
                renewed.append(Timestamp.type)
        return renewed

    def _renew_release_roles(self, targets: Targets, now: datetime) -> dict[str, int]:
        """Re-sign the release roles past half their validity; returns their new versions. Each role version's
        expiry is read once per Repository (its file never changes: consistent snapshots), so `serve`'s check
        every minute does not parse every release's metadata again."""
        roles = targets.delegations.roles if targets.delegations is not None else None
        if not roles:
            return {}
        versions = self._load(Snapshot.type).signed.meta
        renewed: dict[str, int] = {}
        signer: CryptoSigner | None = None
        half = self.expiry.targets / 2
        for role in roles:
            version = versions[f"{role}.json"].version
            md: Metadata[Targets] | None = None
            expires = self._role_expiry.get((role, version))
            if expires is None:
                md = self._load(role, version)
                expires = self._role_expiry[(role, version)] = md.signed.expires
            if expires - now < half:
                signer = signer or self._releases_signer()
                renewed[role] = self._resign_release_role(role, md or self._load(role, version), signer)
        return renewed

    def _resign_release_role(self, role: str, md: Metadata[Targets], signer: CryptoSigner) -> int:
        """Write the next version of a release role, signed by `signer`; returns that version."""
        self._bump(md.signed)
        self._write(md, [signer], role)
        self._role_expiry[(role, md.signed.version)] = md.signed.expires
        return md.signed.version

    def _retire_key(self, role: str, retired_name: str, keys_dir: Path | None = None) -> None:
        """Move keys/<role>.pem to keys/retired/<retired_name> (kept, never overwritten by a later rotation);
        `keys_dir`: the offline directory instead of DATA/keys."""
        keys_dir = keys_dir or self.keys_dir
        retired = keys_dir / "retired"
        retired.mkdir(mode=0o700, exist_ok=True)
        os.replace(keys_dir / f"{role}.pem", retired / retired_name)

    def _root_signer(self, root: Root, offline_dir: Path | None) -> tuple[CryptoSigner, Path]:
        """The current root key and the directory it lives in: offline_dir when given, else DATA/keys. Checked
        against the root metadata before anything is signed with it."""
        online = self.keys_dir / f"{Root.type}.pem"
        if offline_dir is None and not online.exists():
            raise OfflineKeyError(
                "the TUF root key is offline (not in the data directory); give the directory that holds "
                "root.pem: --offline-keys DIR"
            )
        path = offline_dir / f"{Root.type}.pem" if offline_dir is not None else online
        if not path.is_file():
            raise OfflineKeyError(f"{path} does not exist; --offline-keys must name the directory holding root.pem")
        signer = CryptoSigner(load_private_key(path))
        if signer.public_key.keyid not in root.roles[Root.type].keyids:
            raise ConflictError(
                f"{path} is not the current TUF root key (root version {root.version}); give the directory of "
                "the latest root rotation"
            )
        return signer, path.parent

    def rotate_releases_key(self) -> int:
        """Replace the online key that signs the releases' roles (keys/releases.pem; the old one goes to
        keys/retired/). Targets delegates every release role to the new key and each role is re-signed with it
        as a new version, named by a new snapshot and timestamp: devices follow at their next refresh (targets
        is verified with the targets key, which stays), and a role signed by the old key is refused from then
        on. An interrupted rotation is finished by running it again. Returns how many roles were re-signed."""
        with self._lock():
            targets: Metadata[Targets] = self._load(Targets.type)
            if (self.keys_dir / f"{RELEASES_KEY}.pem").exists():
                # Numbered: a rotation without releases leaves targets' version, which could name it, as it was.
                n = len(list(self.keys_dir.glob(f"retired/{RELEASES_KEY}-*.pem"))) + 1
                self._retire_key(RELEASES_KEY, f"{RELEASES_KEY}-{n}.pem")
            signer = self._releases_signer()  # a new key, made on first use
            delegations = targets.signed.delegations
            if delegations is None or not delegations.roles:
                return 0
            for delegated in delegations.roles.values():
                delegated.keyids = [signer.public_key.keyid]
            delegations.keys = {signer.public_key.keyid: signer.public_key}  # release roles are all it delegates
            self._bump(targets.signed)
            self._write(targets, [self._signer(Targets.type)])
            versions = self._load(Snapshot.type).signed.meta
            resigned = {
                role: self._resign_release_role(role, self._load(role, versions[f"{role}.json"].version), signer)
                for role in delegations.roles
            }
            self._write_snapshot_and_timestamp(resigned)
            return len(resigned)

    def rotate_root(self, roles: tuple[str, ...] = (Root.type,), offline_dir: Path | None = None) -> int:
        """Replace the keys of `roles` (root by default) with new ones.

        The new root is signed by the old root key and the new one, so a device holding any earlier root
        walks the chain 1.root.json -> 2.root.json -> ... and trusts the new keys. The root key is read from
        `offline_dir` when given (it must be there when DATA/keys has none), and its successor written beside
        it, the old one to retired/ there. Returns the new version.
        """
        unknown = set(roles) - set(TOP_LEVEL)
        if unknown:
            raise ConflictError(f"unknown role(s) {', '.join(sorted(unknown))}; roles are {', '.join(TOP_LEVEL)}")
        with self._lock():
            root_md: Metadata[Root] = self._load(Root.type)
            root = root_md.signed
            old_root_signer, root_key_dir = self._root_signer(root, offline_dir)
            new_signers: dict[str, CryptoSigner] = {}
            for role in roles:
                for keyid in list(root.roles[role].keyids):
                    root.revoke_key(keyid, role)
                key = Ed25519PrivateKey.generate()
                keys_dir = root_key_dir if role == Root.type else self.keys_dir
                self._retire_key(role, f"{role}-v{root.version}.pem", keys_dir)
                write_private_key(keys_dir / f"{role}.pem", key)
                new_signers[role] = CryptoSigner(key)
                root.add_key(new_signers[role].public_key, role)
            self._bump(root)
            new_root_signer = new_signers.get(Root.type, old_root_signer)
            signers = [old_root_signer] if new_root_signer is old_root_signer else [old_root_signer, new_root_signer]
            self._write(root_md, signers)
            # Re-sign the other roles so their new keys (if any) take effect now.
            targets: Metadata[Targets] = self._load(Targets.type)
            self._bump(targets.signed)
            self._write(targets, [self._signer(Targets.type)])
            self._write_snapshot_and_timestamp()
            return root.version
