"""The audit trail's records: the hash-chained entries and the head row. `server.audit` chains and verifies;
this module reads and writes. Writes join the caller's transaction (`Store.transaction` nests), so a change and
its audit entry commit together.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from server.store import Store

__all__ = ["AuditRecords"]


class AuditRecords:
    """audit and audit_head: entries in sequence order, and the last entry's sequence and hash."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def head(self) -> tuple[int, str] | None:
        """The last entry's (sequence, hash) as the head row records it; None before the first entry."""
        row = self.store.db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def write(
        self, seq: int, at: int, actor: str, action: str, subject: str, detail: str, prev_hash: str, digest: str
    ) -> None:
        """Store one entry and move the head to it, in one transaction (the caller's, if one is open)."""
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO audit (seq, at, actor, action, subject, detail, prev_hash, hash)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [seq, at, actor, action, subject, detail, prev_hash, digest],
            )
            db.execute(
                "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                [seq, digest],
            )

    def newest(self, limit: int = 100, action: str | None = None) -> list[dict[str, Any]]:
        """The newest entries first (optionally of one action), their detail still JSON text."""
        sql = "SELECT * FROM audit" + (" WHERE action = ?" if action else "") + " ORDER BY seq DESC LIMIT ?"
        return list(self.store.db.query(sql, ([action] if action else []) + [limit]))

    def entry(self, seq: int) -> dict[str, Any] | None:
        """One entry by its sequence number (None: there is none)."""
        rows = list(self.store.db.query("SELECT * FROM audit WHERE seq = ?", [seq]))
        return rows[0] if rows else None

    def in_order(self) -> Iterator[dict[str, Any]]:
        """Every entry, oldest first."""
        return self.store.db.query("SELECT * FROM audit ORDER BY seq")
