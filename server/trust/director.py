"""The director: signed per-device assignments with a counter that only goes up, and per-device freshness
statements ("your latest assignment is counter N", valid for `freshness_seconds`).

A fleet rollback is not a replay: it is a new assignment, with the device's next counter, pointing at the
older target. Agents refuse any counter below the highest they have accepted, and any below the newest freshness
statement they have seen, so a superseded assignment replayed to a device that missed its successor is refused.
A statement is signed with every assignment (in its transaction) and re-signed by `refresh_freshness` before it
expires; agents that hold no unexpired one report themselves stale.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.contract import DIRECTOR_KEYS_TARGET
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.files import atomic_write_bytes
from edge_agent.contract.keys import FRESHNESS_CONTEXT, director_key_id
from server import audit
from server.store import Release, Store, now_ms
from server.store.freshness import FreshnessRecords
from server.trust.repository import Repository, load_private_key, write_private_key

__all__ = ["DEFAULT_FRESHNESS_SECONDS", "Director", "IssuedAssignment"]

_AUDIT_DEVICES = 200  # an assignment batch's audit entry names this many devices (and counts all)
DEFAULT_FRESHNESS_SECONDS = 24 * 3600.0


@dataclass(frozen=True)
class IssuedAssignment:
    device_id: str
    counter: int
    release_id: str


class Director:
    def __init__(self, key: Ed25519PrivateKey, freshness_seconds: float = DEFAULT_FRESHNESS_SECONDS) -> None:
        if not freshness_seconds > 0:
            raise ValueError("a freshness statement's validity must be positive")
        self.freshness_seconds = freshness_seconds
        self._key = key
        self._raw_public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = director_key_id(self._raw_public)

    @classmethod
    def create(cls, path: Path) -> Director:
        key = Ed25519PrivateKey.generate()
        write_private_key(path, key)
        return cls(key)

    @classmethod
    def load(cls, path: Path, freshness_seconds: float = DEFAULT_FRESHNESS_SECONDS) -> Director:
        return cls(load_private_key(path), freshness_seconds)

    @classmethod
    def rotate(
        cls, keys_dir: Path, trust_dir: Path, repository: Repository, retire_previous: bool = False
    ) -> tuple[Director, Director]:
        """Replace the director key without re-provisioning devices. The trusted set is published as a TUF
        target signed by the targets role; an agent that meets an unknown key id fetches it and checks it through
        TUF, and trusts exactly the set it fetched. The set holds the new key and the one it replaces, so
        assignments already in flight stay valid; with `retire_previous` only the new key (after a suspected
        compromise: the old key's signatures are refused by every agent that has learned the set). The previous
        key is kept beside the new one either way. Returns (old, new)."""
        path = keys_dir / "director.pem"
        old = cls.load(path)
        new_key = Ed25519PrivateKey.generate()
        new = cls(new_key)
        trusted = new.public_keys() if retire_previous else {**new.public_keys(), **old.public_keys()}
        document = json.dumps(trusted, indent=1, sort_keys=True).encode()
        repository.add_target(DIRECTOR_KEYS_TARGET, document, {"kind": "director-keys"}, replace=True)
        write_private_key(keys_dir / f"director-retired-{old.key_id[:16]}.pem", old._key)
        write_private_key(path, new_key)
        atomic_write_bytes(trust_dir / "director_keys.json", document)  # what new enrollments get
        return old, new

    def restate_freshness(self, store: Store) -> int:
        """Sign every device's freshness statement again with this key, now (after a rotation that retired the
        previous key: agents that learned the new list refuse statements the retired key signed, and would
        report themselves stale until each statement's renewal). `serve` publishes them. Returns how many."""
        now = now_ms()
        restated = 0
        with store.transaction():
            records = FreshnessRecords(store)
            # A statement signed here expires at now + validity, so it is not due again: the loop ends.
            while due := records.due(now + int(self.freshness_seconds * 1000)):
                for device_id, highest in due:
                    self._store_freshness(store, device_id, highest, now)
                restated += len(due)
        return restated

    def public_keys(self) -> dict[str, str]:
        """What agents trust: {key_id: raw Ed25519 public key hex}."""
        return {self.key_id: self._raw_public.hex()}

    def sign(self, assignment: pb.Assignment) -> pb.SignedAssignment:
        body = assignment.SerializeToString(deterministic=True)
        return pb.SignedAssignment(assignment=body, key_id=self.key_id, signature=self._key.sign(body))

    def sign_freshness(self, device_id: str, counter: int, issued_at: int) -> pb.SignedFreshness:
        statement = pb.Freshness(
            device_id=device_id,
            counter=counter,
            issued_at_ms=issued_at,
            expires_at_ms=issued_at + int(self.freshness_seconds * 1000),
        )
        body = statement.SerializeToString(deterministic=True)
        signature = self._key.sign(FRESHNESS_CONTEXT + body)
        return pb.SignedFreshness(freshness=body, key_id=self.key_id, signature=signature)

    def _store_freshness(self, store: Store, device_id: str, counter: int, issued_at: int) -> None:
        signed = self.sign_freshness(device_id, counter, issued_at)
        expires_at = issued_at + int(self.freshness_seconds * 1000)
        FreshnessRecords(store).put(device_id, counter, issued_at, expires_at, signed.SerializeToString())

    def refresh_freshness(self, store: Store, now: int | None = None) -> int:
        """Sign a new statement for every device whose statement is missing, behind its highest counter, or past
        half its validity; returns how many. Reading the counters and writing the statements is one transaction,
        so an assignment committed meanwhile is never stated as older than it is."""
        now = now_ms() if now is None else now
        renewed = 0
        with store.transaction():
            for device_id, highest in FreshnessRecords(store).due(now + int(self.freshness_seconds * 500)):
                self._store_freshness(store, device_id, highest, now)
                renewed += 1
        return renewed

    def assign(
        self, store: Store, device_ids: Sequence[str], release: Release, rollout_id: str = "", actor: str = "cli"
    ) -> list[IssuedAssignment]:
        """Sign and store one new assignment per device (next counter each), and the batch in the audit trail;
        `fedfleet serve` publishes them. Joins the caller's transaction if one is open."""
        if not device_ids:
            return []
        for device_id in device_ids:
            store.device(device_id)  # raises NotFoundError with a clear message
        issued: list[IssuedAssignment] = []
        with store.transaction():
            highest = store.highest_counters(device_ids)
            issued_at = now_ms()
            for device_id in device_ids:
                counter = highest[device_id] + 1
                signed = self.sign(
                    pb.Assignment(
                        device_id=device_id,
                        target_path=release.target_path,
                        target_length=release.length,
                        target_sha256=release.sha256,
                        counter=counter,
                        release_id=release.id,
                        issued_at_ms=issued_at,
                        rollout_id=rollout_id,
                    )
                )
                store.add_assignment(device_id, counter, release.id, rollout_id, signed.SerializeToString(), issued_at)
                self._store_freshness(store, device_id, counter, issued_at)
                issued.append(IssuedAssignment(device_id, counter, release.id))
            detail = {
                "release": release.id,
                "rollout": rollout_id,
                "count": len(issued),
                "devices": {a.device_id: a.counter for a in issued[:_AUDIT_DEVICES]},
                "key_id": self.key_id,
            }
            audit.append(store, "assignment.batch", release.id, detail, actor)
        return issued
