"""The audit trail: an append-only, hash-chained log of every change to releases, assignments, rollouts, keys and
devices.

Entry n's hash covers its own fields and entry n-1's hash, so editing an entry breaks its hash and deleting one
breaks its successor's link. A head row (last sequence and hash), written in the same transaction as each append,
catches entries cut from the end. Appends join the caller's transaction: the change and its record commit together.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from server.store import Store, now_ms
from server.store.audit import AuditRecords

__all__ = ["AuditProblem", "append", "entries", "verify"]

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
