"""The users table: people who sign in to the API, their role and their token's hash (never the token)."""

from __future__ import annotations

import sqlite3
from typing import Any

from server.errors import ConflictError, NotFoundError
from server.store import Store, now_ms

__all__ = ["UserRecords"]

_COLUMNS = "name, role, created_at, rotated_at, revoked_at"


class UserRecords:
    """users: one row per person; a revoked row stays (the audit trail names it) but no longer signs in."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, name: str, role: str, token_hash: str) -> dict[str, Any]:
        now = now_ms()
        try:
            with self.store.transaction() as db:
                db.execute(
                    "INSERT INTO users (name, role, token_hash, created_at, rotated_at) VALUES (?, ?, ?, ?, ?)",
                    [name, role, token_hash, now, now],
                )
        except sqlite3.IntegrityError as e:
            raise ConflictError(f"user {name!r} exists already; rotate its token or choose another name") from e
        return self.get(name)

    def get(self, name: str) -> dict[str, Any]:
        rows = list(self.store.db.query(f"SELECT {_COLUMNS} FROM users WHERE name = ?", [name]))
        if not rows:
            raise NotFoundError(f"no user {name!r}; `fedfleet users list` shows them")
        return rows[0]

    def find(self, name: str) -> dict[str, Any] | None:
        rows = list(self.store.db.query(f"SELECT {_COLUMNS} FROM users WHERE name = ?", [name]))
        return rows[0] if rows else None

    def all(self) -> list[dict[str, Any]]:
        return list(self.store.db.query(f"SELECT {_COLUMNS} FROM users ORDER BY name"))

    def by_token_hash(self, token_hash: str) -> dict[str, Any] | None:
        """The live (not revoked) user holding the token with this hash, with the stored hash to compare."""
        rows = list(
            self.store.db.query(
                f"SELECT {_COLUMNS}, token_hash FROM users WHERE token_hash = ? AND revoked_at IS NULL", [token_hash]
            )
        )
        return rows[0] if rows else None

    def set_token_hash(self, name: str, token_hash: str, role: str | None = None, revive: bool = False) -> None:
        """A new token (and role) for a user; `revive` signs a revoked user in again (the operator's break-glass)."""
        with self.store.transaction() as db:
            cursor = db.execute(
                "UPDATE users SET token_hash = ?, rotated_at = ?, role = coalesce(?, role),"
                " revoked_at = CASE WHEN ? THEN NULL ELSE revoked_at END WHERE name = ?",
                [token_hash, now_ms(), role, int(revive), name],
            )
        if cursor.rowcount != 1:
            raise NotFoundError(f"no user {name!r}; `fedfleet users list` shows them")

    def revoke(self, name: str) -> bool:
        """Mark the user revoked; False if they were already."""
        self.get(name)
        with self.store.transaction() as db:
            cursor = db.execute(
                "UPDATE users SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", [now_ms(), name]
            )
        return cursor.rowcount == 1
