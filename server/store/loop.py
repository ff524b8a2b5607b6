"""The closed loop's records: fleet drift alarms, retrain jobs, alerts and webhook deliveries. Every SQL string of
the loop lives here; `server.loop` decides, this module reads and writes. Writes join the caller's transaction
(`Store.transaction` nests), so a decision and its records commit together.
"""

from __future__ import annotations

import json
from typing import Any

from server.errors import NotFoundError
from server.store import Store, now_ms

__all__ = ["AlarmRecords", "AlertRecords", "DeliveryRecords", "JobRecords"]


class AlarmRecords:
    """drift_alarms: at most one open alarm per (fleet, release); a resolved one stays as history."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def open(
        self,
        fleet: str,
        release_id: str,
        metric: str,
        threshold: float,
        value: float,
        devices: int,
        decision: str,
        at: int,
    ) -> int:
        with self.store.transaction() as db:
            cursor = db.execute(
                """INSERT INTO drift_alarms (fleet, release_id, metric, threshold, value, peak, last_value, devices,
                     decision, state, opened_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'open', ?)""",
                [fleet, release_id, metric, threshold, value, value, value, devices, decision, at],
            )
            return int(cursor.lastrowid or 0)

    def observe(self, alarm_id: int, value: float) -> None:
        self.store.db.execute(
            "UPDATE drift_alarms SET last_value = ?, peak = max(peak, ?) WHERE id = ?", [value, value, alarm_id]
        )

    def resolve(self, alarm_id: int, resolution: str, at: int) -> bool:
        cursor = self.store.db.execute(
            """UPDATE drift_alarms SET state = 'resolved', resolution = ?, resolved_at = ?
               WHERE id = ? AND state = 'open'""",
            [resolution, at, alarm_id],
        )
        return cursor.rowcount == 1

    def open_alarms(self, fleet: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM drift_alarms WHERE state = 'open'" + (" AND fleet = ?" if fleet else "") + " ORDER BY id"
        return list(self.store.db.query(sql, [fleet] if fleet else []))

    def last_resolved_at(self, fleet: str, release_id: str) -> int | None:
        row = self.store.db.execute(
            "SELECT max(resolved_at) FROM drift_alarms WHERE fleet = ? AND release_id = ? AND state = 'resolved'",
            [fleet, release_id],
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def get(self, alarm_id: int) -> dict[str, Any]:
        rows = list(self.store.db.query("SELECT * FROM drift_alarms WHERE id = ?", [alarm_id]))
        if not rows:
            raise NotFoundError(f"no drift alarm {alarm_id}; `fedfleet loop status` lists them")
        return rows[0]

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        return list(self.store.db.query("SELECT * FROM drift_alarms ORDER BY id DESC LIMIT ?", [limit]))


class JobRecords:
    """retrain_jobs: what an alarm led to, step by step (the state names are server.loop.retrain.JobState's)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def create(self, alarm_id: int, fleet: str, from_release: str, cause: str, engine: str, state: str) -> int:
        now = now_ms()
        with self.store.transaction() as db:
            cursor = db.execute(
                """INSERT INTO retrain_jobs (alarm_id, fleet, from_release, cause, engine, state, created_at,
                     updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                [alarm_id, fleet, from_release, cause, engine, state, now, now],
            )
            return int(cursor.lastrowid or 0)

    def get(self, job_id: int) -> dict[str, Any]:
        rows = list(self.store.db.query("SELECT * FROM retrain_jobs WHERE id = ?", [job_id]))
        if not rows:
            raise NotFoundError(f"no retrain job {job_id}; `fedfleet loop status` lists them")
        return rows[0]

    def update(self, job_id: int, expect: str | tuple[str, ...], **fields: Any) -> bool:
        """Set `fields` (state, run_id, ...) if the job is still in state `expect`; False when it was not."""
        states = (expect,) if isinstance(expect, str) else expect
        names = sorted(fields)
        cursor = self.store.db.execute(
            f"UPDATE retrain_jobs SET {', '.join(f'{n} = ?' for n in names)}, updated_at = ?"
            f" WHERE id = ? AND state IN ({','.join('?' * len(states))})",
            [*(fields[n] for n in names), now_ms(), job_id, *states],
        )
        return cursor.rowcount == 1

    def in_states(self, *states: str) -> list[dict[str, Any]]:
        return list(
            self.store.db.query(
                f"SELECT * FROM retrain_jobs WHERE state IN ({','.join('?' * len(states))}) ORDER BY id", list(states)
            )
        )

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        return list(self.store.db.query("SELECT * FROM retrain_jobs ORDER BY id DESC LIMIT ?", [limit]))

    def counts(self) -> list[tuple[str, int]]:
        rows = self.store.db.execute("SELECT state, count(*) FROM retrain_jobs GROUP BY state ORDER BY 1")
        return [(r[0], int(r[1])) for r in rows]


class AlertRecords:
    """alerts: one alert that is not resolved per key; its history stays."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def live(self, key: str) -> dict[str, Any] | None:
        rows = list(self.store.db.query("SELECT * FROM alerts WHERE key = ? AND state != 'resolved'", [key]))
        return _alert_row(rows[0]) if rows else None

    def insert(self, kind: str, subject: str, key: str, summary: str, detail: dict[str, Any]) -> int:
        now = now_ms()
        cursor = self.store.db.execute(
            """INSERT INTO alerts (kind, subject, key, state, summary, detail, created_at, updated_at)
               VALUES (?, ?, ?, 'open', ?, ?, ?, ?)""",
            [kind, subject, key, summary, json.dumps(detail, sort_keys=True, default=str), now, now],
        )
        return int(cursor.lastrowid or 0)

    def set_state(self, alert_id: int, state: str, actor: str = "") -> bool:
        """Acknowledge (an open alert) or resolve (one that is not resolved yet)."""
        now = now_ms()
        if state == "acknowledged":
            cursor = self.store.db.execute(
                "UPDATE alerts SET state = ?, acknowledged_by = ?, updated_at = ? WHERE id = ? AND state = 'open'",
                [state, actor, now, alert_id],
            )
        else:
            cursor = self.store.db.execute(
                "UPDATE alerts SET state = ?, resolved_at = ?, updated_at = ? WHERE id = ? AND state != 'resolved'",
                [state, now, now, alert_id],
            )
        return cursor.rowcount == 1

    def get(self, alert_id: int) -> dict[str, Any]:
        rows = list(self.store.db.query("SELECT * FROM alerts WHERE id = ?", [alert_id]))
        if not rows:
            raise NotFoundError(f"no alert {alert_id}; `fedfleet alerts list` shows them")
        return _alert_row(rows[0])

    def recent(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        sql = "SELECT * FROM alerts" + (" WHERE state = ?" if state else "") + " ORDER BY id DESC LIMIT ?"
        return [_alert_row(r) for r in self.store.db.query(sql, ([state] if state else []) + [limit])]

    def live_keys(self, prefix: str) -> list[str]:
        rows = self.store.db.execute(
            "SELECT key FROM alerts WHERE state != 'resolved' AND key >= ? AND key < ?", [prefix, prefix + "\uffff"]
        )
        return [r[0] for r in rows]

    def counts(self) -> list[tuple[str, str, int]]:
        """(kind, state, count) over every alert, for /metrics."""
        rows = self.store.db.execute("SELECT kind, state, count(*) FROM alerts GROUP BY kind, state ORDER BY 1, 2")
        return [(r[0], r[1], int(r[2])) for r in rows]


class DeliveryRecords:
    """alert_deliveries: a webhook POST per (alert event, endpoint), pending until delivered or given up."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def enqueue(self, alert_id: int, event: str, url: str) -> int:
        now = now_ms()
        cursor = self.store.db.execute(
            """INSERT INTO alert_deliveries (alert_id, event, url, state, created_at, updated_at)
               VALUES (?, ?, ?, 'pending', ?, ?)""",
            [alert_id, event, url, now, now],
        )
        return int(cursor.lastrowid or 0)

    def pending(self, limit: int) -> list[dict[str, Any]]:
        return list(
            self.store.db.query("SELECT * FROM alert_deliveries WHERE state = 'pending' ORDER BY id LIMIT ?", [limit])
        )

    def pending_count(self) -> int:
        return int(self.store.db.execute("SELECT count(*) FROM alert_deliveries WHERE state = 'pending'").fetchone()[0])

    def drop_oldest(self, keep: int) -> int:
        """Mark all but the newest `keep` pending deliveries dropped; returns how many were dropped."""
        cursor = self.store.db.execute(
            """UPDATE alert_deliveries SET state = 'dropped', last_result = 'queue full', updated_at = ?
               WHERE state = 'pending' AND id NOT IN
                 (SELECT id FROM alert_deliveries WHERE state = 'pending' ORDER BY id DESC LIMIT ?)""",
            [now_ms(), keep],
        )
        return cursor.rowcount

    def attempted(self, delivery_id: int, state: str, result: str) -> None:
        self.store.db.execute(
            """UPDATE alert_deliveries SET state = ?, attempts = attempts + 1, last_result = ?, updated_at = ?
               WHERE id = ?""",
            [state, result[:500], now_ms(), delivery_id],
        )

    def recent(self, alert_id: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
        where = " WHERE alert_id = ?" if alert_id else ""
        sql = f"SELECT * FROM alert_deliveries{where} ORDER BY id DESC LIMIT ?"
        return list(self.store.db.query(sql, ([alert_id] if alert_id else []) + [limit]))

    def counts(self) -> list[tuple[str, int]]:
        rows = self.store.db.execute("SELECT state, count(*) FROM alert_deliveries GROUP BY state ORDER BY 1")
        return [(r[0], int(r[1])) for r in rows]


def _alert_row(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "detail": json.loads(row["detail"])}
