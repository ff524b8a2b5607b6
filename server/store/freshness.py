"""Freshness records: the director's current signed statement per device ("your latest assignment is counter N",
with an expiry), which devices have not yet been pushed theirs, and the devices that fall behind (stale, or
running another release than assigned for too long). Writes join the caller's transaction.

Invariant: a device's stored statement never goes back: `put` keeps the stored one when it names a higher
counter, so a refresh that read the counters before a concurrent `fedfleet assign` committed cannot undo it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from server.store import Store, now_ms

__all__ = ["FreshnessRecords"]

_HIGHEST = "COALESCE((SELECT max(counter) FROM assignments a WHERE a.device_id = d.id), 0)"


class FreshnessRecords:
    def __init__(self, store: Store) -> None:
        self.store = store

    def put(self, device_id: str, counter: int, issued_at: int, expires_at: int, signed: bytes) -> bool:
        """Store a device's new statement (to be published); returns False if the stored one names a higher
        counter (and is kept)."""
        cursor = self.store.db.execute(
            """INSERT INTO freshness (device_id, counter, issued_at, expires_at, signed) VALUES (?, ?, ?, ?, ?)
               ON CONFLICT (device_id) DO UPDATE SET counter = excluded.counter, issued_at = excluded.issued_at,
                 expires_at = excluded.expires_at, signed = excluded.signed, published_at = NULL
               WHERE excluded.counter >= freshness.counter""",
            [device_id, counter, issued_at, expires_at, signed],
        )
        return cursor.rowcount == 1

    def current(self, device_id: str) -> dict[str, Any] | None:
        rows = list(self.store.db.query("SELECT * FROM freshness WHERE device_id = ?", [device_id]))
        return rows[0] if rows else None

    def answer(self, device_id: str) -> tuple[bytes | None, int, bytes | None]:
        """What the director answers a device's Register and Check with, in one query: its current statement
        (signed), and the counter and signed bytes of its newest assignment (None, 0, None where there is none)."""
        row = self.store.db.execute(
            """SELECT (SELECT signed FROM freshness WHERE device_id = ?1), a.counter, a.signed FROM (SELECT 1)
               LEFT JOIN (SELECT counter, signed FROM assignments WHERE device_id = ?1 ORDER BY counter DESC LIMIT 1)
               a ON 1""",
            [device_id],
        ).fetchone()
        return row[0], row[1] or 0, row[2]

    def due(self, renew_before: int, limit: int = 5000) -> list[tuple[str, int]]:
        """(device, highest assignment counter) of registered devices whose statement is missing, behind their
        highest counter, or expires before `renew_before`."""
        rows = self.store.db.execute(
            f"""SELECT d.id, {_HIGHEST} AS highest FROM devices d LEFT JOIN freshness f ON f.device_id = d.id
                WHERE f.device_id IS NULL OR f.expires_at < ? OR f.counter != {_HIGHEST}
                ORDER BY d.id LIMIT ?""",
            [renew_before, limit],
        )
        return [(r[0], int(r[1])) for r in rows]

    def unpublished(self, limit: int = 5000) -> list[dict[str, Any]]:
        return list(
            self.store.db.query(
                "SELECT device_id, issued_at, signed FROM freshness WHERE published_at IS NULL LIMIT ?", [limit]
            )
        )

    def mark_published(self, keys: list[tuple[str, int]]) -> None:
        """Mark (device, issued_at) statements published; one re-signed meanwhile stays unpublished."""
        with self.store.transaction() as db:
            db.conn.executemany(
                "UPDATE freshness SET published_at = ? WHERE device_id = ? AND issued_at = ?",
                [(now_ms(), d, t) for d, t in keys],
            )

    def lagging(self, assigned_before: int, fleet: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Devices whose latest assignment (issued before `assigned_before`) names another release than the one
        they report running, oldest assignment first."""
        sql = f"""SELECT d.id AS device_id, d.fleet, d.online, d.stale, d.fresh_until, d.last_seen,
                   d.running_release, d.running_counter, a.release_id AS assigned_release,
                   a.counter AS assigned_counter, a.created_at AS assigned_at, d.last_event
                FROM devices d JOIN assignments a ON a.device_id = d.id AND a.counter = {_HIGHEST}
                WHERE a.release_id != d.running_release AND a.created_at < ?{" AND d.fleet = ?" if fleet else ""}
                ORDER BY a.created_at, d.id LIMIT ?"""
        params: list[Any] = [assigned_before, *([fleet] if fleet else []), limit]
        return [{**r, "online": bool(r["online"]), "stale": bool(r["stale"])} for r in self.store.db.query(sql, params)]

    def stale_devices(self, fleet: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Devices whose last status said they hold no unexpired freshness statement."""
        sql = (
            "SELECT id AS device_id, fleet, online, fresh_until, last_seen, running_release FROM devices"
            f" WHERE stale = 1{' AND fleet = ?' if fleet else ''} ORDER BY id LIMIT ?"
        )
        params: list[Any] = [*([fleet] if fleet else []), limit]
        return [{**r, "online": bool(r["online"])} for r in self.store.db.query(sql, params)]

    def behind(self, assigned_before: int, fleet: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Devices that are stale, lagging (see `lagging`), or both, one row each, with `stale` and `lagging`."""
        rows: dict[str, dict[str, Any]] = {}
        for r in self.lagging(assigned_before, fleet, limit):
            rows[r["device_id"]] = {**r, "lagging": True}
        for r in self.stale_devices(fleet, limit):
            if r["device_id"] in rows:
                continue
            device = self.store.device(r["device_id"])
            current = self.store.current_assignment(r["device_id"])
            rows[r["device_id"]] = {
                **r,
                "stale": True,
                "lagging": False,
                "running_counter": device["running_counter"],
                "assigned_release": current["release_id"] if current else "",
                "assigned_counter": current["counter"] if current else 0,
                "assigned_at": current["created_at"] if current else None,
                "last_event": device["last_event"],
            }
        return sorted(rows.values(), key=lambda r: r["device_id"])[:limit]

    def behind_by_fleet(self, assigned_before: int) -> dict[str, tuple[int, int]]:
        """Per fleet: (stale devices, lagging devices) — for /metrics."""
        stale = Counter(r[0] for r in self.store.db.execute("SELECT fleet FROM devices WHERE stale = 1"))
        lagging = Counter(r["fleet"] for r in self.lagging(assigned_before, limit=1_000_000))
        return {f: (stale[f], lagging[f]) for f in sorted(set(stale) | set(lagging))}
