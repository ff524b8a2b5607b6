"""The audit trail: an append-only, hash-chained log of every change to releases, assignments, rollouts, keys and
devices.

Entry n's hash covers its own fields and entry n-1's hash, so editing an entry breaks its hash and deleting one
breaks its successor's link. A head row (last sequence and hash), written in the same transaction as each append,
catches entries cut from the end. Appends join the caller's transaction: the change and its record commit together.

Anchors catch what the database alone cannot: a copy restored from an older backup, or entries cut from the end
together with the head row. An anchor is the head (sequence and hash) signed with the coordinator's audit key
(DATA/keys/audit.pem, Ed25519, 0600, made on first use) and exported off the database: a file under
DATA/audit-anchors/ (`fedfleet serve` every `[audit] anchor_seconds`, `fedfleet audit anchor` on demand) and the
webhooks that want every event. `fedfleet audit verify --against EXPORT` then fails when the database's trail ends
before the exported sequence, holds another entry at it, or when the export's signature is not the key's.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge_agent.contract.files import atomic_write_bytes
from server.errors import CoordinatorError
from server.store import Store, now_ms
from server.store.audit import AuditRecords
from server.trust.keyfile import read_key, write_key

__all__ = [
    "ANCHOR_FORMAT",
    "AnchorError",
    "AuditProblem",
    "anchor",
    "anchor_key",
    "anchor_public_key",
    "append",
    "check_anchor",
    "entries",
    "read_anchor",
    "verify",
    "write_anchor",
]

GENESIS = "0" * 64


def _digest(seq: int, at: int, actor: str, action: str, subject: str, detail: str, prev_hash: str) -> str:
    body = json.dumps([seq, at, actor, action, subject, detail, prev_hash], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def append(store: Store, action: str, subject: str, detail: dict[str, Any], actor: str = "coordinator") -> int:
    """Append one entry (inside the caller's transaction if one is open); returns its sequence number."""
    records = AuditRecords(store)
    with store.transaction():
        head = records.head()
        seq, prev = (head[0] + 1, head[1]) if head else (1, GENESIS)
        at = now_ms()
        text = json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str)
        digest = _digest(seq, at, actor, action, subject, text, prev)
        records.write(seq, at, actor, action, subject, text, prev, digest)
    return seq


def entries(store: Store, limit: int = 100, action: str | None = None) -> list[dict[str, Any]]:
    """The newest entries first."""
    return [{**r, "detail": json.loads(r["detail"])} for r in AuditRecords(store).newest(limit, action)]


@dataclass(frozen=True)
class AuditProblem:
    seq: int
    problem: str

    def __str__(self) -> str:
        return f"entry {self.seq}: {self.problem}"


def verify(store: Store) -> tuple[int, list[AuditProblem]]:
    """Walk the chain; returns how many entries were checked and every problem found (empty: intact)."""
    problems: list[AuditProblem] = []
    expected_seq, prev = 1, GENESIS
    checked = 0
    records = AuditRecords(store)
    for r in records.in_order():
        checked += 1
        seq = r["seq"]
        if seq != expected_seq:
            missing = str(expected_seq) if seq == expected_seq + 1 else f"{expected_seq}..{seq - 1}"
            problems.append(AuditProblem(expected_seq, f"deleted (entries {missing} are missing before entry {seq})"))
        elif r["prev_hash"] != prev:
            problems.append(AuditProblem(seq - 1, f"replaced: entry {seq} was chained to another version of it"))
        if _digest(seq, r["at"], r["actor"], r["action"], r["subject"], r["detail"], r["prev_hash"]) != r["hash"]:
            problems.append(AuditProblem(seq, f"edited: {r['action']} {r['subject']} no longer matches its hash"))
        expected_seq, prev = seq + 1, r["hash"]
    head = records.head()
    if head is not None and head[0] >= expected_seq:
        problems.append(
            AuditProblem(
                expected_seq, f"deleted from the end (the log ends at {expected_seq - 1}, its head says {head[0]})"
            )
        )
    elif head is not None and head[1] != prev:
        problems.append(AuditProblem(head[0], "the last entry does not match the recorded head hash"))
    return checked, problems


# ----- anchors -----

ANCHOR_FORMAT = "fedfleet-audit-anchor/1"
ANCHOR_KEY = "audit.pem"  # in DATA/keys


class AnchorError(CoordinatorError):
    """An anchor export is unreadable, not signed by this coordinator, or the database disagrees with it."""


def anchor_key(keys_dir: Path) -> Ed25519PrivateKey:
    """The coordinator's audit key (keys/audit.pem), made on first use: 0600, encrypted like the other keys when
    a key passphrase is set."""
    path = keys_dir / ANCHOR_KEY
    if not path.exists():
        write_key(path, Ed25519PrivateKey.generate())
    key = read_key(path)
    if not isinstance(key, Ed25519PrivateKey):
        raise AnchorError(f"{path} is not an Ed25519 private key; move it away and a new audit key is made")
    return key


def anchor_public_key(keys_dir: Path) -> Ed25519PublicKey:
    """The audit key's public half, to check exports with; never makes a key."""
    if not (keys_dir / ANCHOR_KEY).exists():
        raise AnchorError(
            f"this coordinator has no audit key ({keys_dir / ANCHOR_KEY}): no export can be its own; run "
            "`fedfleet audit anchor` to make one"
        )
    return anchor_key(keys_dir).public_key()


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _anchor_message(seq: int, head_hash: str, at: int, key_id: str) -> bytes:
    return json.dumps([ANCHOR_FORMAT, seq, head_hash, at, key_id], separators=(",", ":")).encode()


def anchor(store: Store, key: Ed25519PrivateKey) -> dict[str, Any]:
    """The audit head now, signed: {format, seq, hash, at, key_id, signature}. seq 0: an empty trail."""
    head = AuditRecords(store).head()
    seq, head_hash = head if head is not None else (0, GENESIS)
    at = now_ms()
    key_id = hashlib.sha256(_raw(key.public_key())).hexdigest()
    signature = key.sign(_anchor_message(seq, head_hash, at, key_id)).hex()
    return {"format": ANCHOR_FORMAT, "seq": seq, "hash": head_hash, "at": at, "key_id": key_id, "signature": signature}


def write_anchor(doc: dict[str, Any], path: Path) -> Path:
    """Write an anchor export atomically (the directory made 0700 if it is new)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    return path


def read_anchor(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise AnchorError(
            f"{path} cannot be read as an audit anchor export ({e}); give a file `audit anchor` wrote"
        ) from e
    fields = {"format": str, "seq": int, "hash": str, "at": int, "key_id": str, "signature": str}
    if (
        not isinstance(doc, dict)
        or doc.get("format") != ANCHOR_FORMAT
        or any(not isinstance(doc.get(k), t) or isinstance(doc.get(k), bool) for k, t in fields.items())
    ):
        raise AnchorError(f"{path} is not an audit anchor export ({ANCHOR_FORMAT}); give a file `audit anchor` wrote")
    return doc


def check_anchor(store: Store, doc: dict[str, Any], public: Ed25519PublicKey) -> None:
    """Raise AnchorError (one sentence) unless the export is signed by `public` and the database's trail reaches
    the exported entry with the same hash."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(doc["at"] / 1000))
    key_id = hashlib.sha256(_raw(public)).hexdigest()
    try:
        if doc["key_id"] != key_id:
            raise InvalidSignature
        public.verify(bytes.fromhex(doc["signature"]), _anchor_message(doc["seq"], doc["hash"], doc["at"], key_id))
    except (InvalidSignature, ValueError):
        raise AnchorError(
            f"the export of {when} is not signed by this coordinator's audit key (keys/{ANCHOR_KEY}): it was altered "
            "or comes from another coordinator"
        ) from None
    records = AuditRecords(store)
    head = records.head()
    last = head[0] if head is not None else 0
    if last < doc["seq"]:
        raise AnchorError(
            f"the database's audit trail ends at entry {last} but the export of {when} was signed at entry "
            f"{doc['seq']}: the database was restored from an older copy or cut at its tail"
        )
    if doc["seq"] == 0:
        return
    entry = records.entry(doc["seq"])
    if entry is None or entry["hash"] != doc["hash"]:
        raise AnchorError(
            f"entry {doc['seq']} of the database is not the one the export of {when} signed: the trail was rewritten"
        )
