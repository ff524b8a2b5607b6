"""Read-only queries for the dashboard and Prometheus `/metrics`: what the pages and the scrape read and no other
part of the coordinator needs. They never write. Reads that others share (a device, a rollout's status, the
ledger) stay with their domain's records.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any

from server.store import Store

__all__ = ["CHANGE_MARKS", "DashboardReads"]

# Per live topic, a few cheap high-water marks: when one moves, that part of the state changed.
CHANGE_MARKS: dict[str, str] = {
    "rollouts": "SELECT (SELECT count(*) FROM rollouts), (SELECT max(updated_at) FROM rollouts),"
    " (SELECT max(id) FROM rollout_decisions), (SELECT max(rowid) FROM rollout_gate_samples)",
    "devices": "SELECT count(*), max(last_seen), sum(online), max(last_event_at) FROM devices",
    "events": "SELECT max(id) FROM events",
    "telemetry": "SELECT max(rowid) FROM telemetry",
    "audit": "SELECT max(seq) FROM audit",
    "training": "SELECT (SELECT count(*) FROM fl_rounds), (SELECT count(*) FROM fl_runs WHERE status != 'running')",
}


class DashboardReads:
    """Reads across tables, shaped for a page or a metric family."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # ----- live updates -----

    def change_marks(self) -> dict[str, tuple[Any, ...]]:
        """Each topic of CHANGE_MARKS with its marks now."""
        db = self.store.db
        return {topic: tuple(db.execute(sql).fetchone()) for topic, sql in CHANGE_MARKS.items()}

    # ----- pages -----

    def device_windows(self, device_id: str, limit: int) -> list[dict[str, Any]]:
        """A device's newest telemetry windows (with the window as received, `payload`)."""
        return list(
            self.store.db.query(
                """SELECT sequence, first_sequence, release_id, start_ms, end_ms, inferences, errors, payload, via
                   FROM telemetry WHERE device_id = ? ORDER BY sequence DESC LIMIT ?""",
                [device_id, limit],
            )
        )

    def device_rollouts(self, device_id: str) -> list[str]:
        """The rollouts that took a device, newest first."""
        return [
            r["rollout_id"]
            for r in self.store.db.query(
                "SELECT rollout_id FROM rollout_devices WHERE device_id = ? ORDER BY rowid DESC", [device_id]
            )
        ]

    def gate_history(self, rollout_id: str, points: int) -> list[dict[str, Any]]:
        """A rollout's gate samples (gates as JSON text), oldest first, thinned evenly to about `points` (the
        newest always kept)."""
        return list(
            self.store.db.query(
                """SELECT wave, at, gates FROM (
                     SELECT wave, at, gates, row_number() OVER (ORDER BY at) AS rn, count(*) OVER () AS n
                     FROM rollout_gate_samples WHERE rollout_id = ?)
                   WHERE (rn - 1) % max(1, n / ?) = 0 OR rn = n ORDER BY at""",
                [rollout_id, points],
            )
        )

    def recent_windows(self, since_ms: int, release_id: str, limit: int) -> list[tuple[int, str, str, int]]:
        """(rowid, device, release, end) of the newest windows that ended since a time (of one release, unless
        `release_id` is empty), newest first."""
        sql = "SELECT rowid, device_id, release_id, end_ms FROM telemetry WHERE end_ms >= ?"
        args: list[Any] = [since_ms]
        if release_id:
            sql += " AND release_id = ?"
            args.append(release_id)
        return [tuple(r) for r in self.store.db.execute(sql + " ORDER BY end_ms DESC LIMIT ?", [*args, limit])]

    def payloads(self, rowids: list[int]) -> Iterator[bytes]:
        """The windows (as received) with these rowids."""
        for chunk in range(0, len(rowids), 500):
            part = rowids[chunk : chunk + 500]
            for (payload,) in self.store.db.execute(
                f"SELECT payload FROM telemetry WHERE rowid IN ({','.join('?' * len(part))})", part
            ):
                yield payload

    # ----- /metrics -----

    def devices_by_state(self) -> list[tuple[str, str, int, int]]:
        """(update state, running release, online, count)."""
        rows = self.store.db.execute(
            "SELECT update_state, running_release, online, count(*) FROM devices GROUP BY 1, 2, 3"
        )
        return [tuple(r) for r in rows]

    def events_by_kind(self) -> list[tuple[str, int]]:
        return [tuple(r) for r in self.store.db.execute("SELECT kind, count(*) FROM events GROUP BY kind")]

    def windows_by_transport(self) -> list[tuple[str, int]]:
        return [tuple(r) for r in self.store.db.execute("SELECT via, windows FROM telemetry_ingested ORDER BY via")]

    def rollout_phases(self) -> list[tuple[str, str, str, int]]:
        """(id, release, phase, wave) of every rollout."""
        return [tuple(r) for r in self.store.db.execute("SELECT id, release_id, phase, wave FROM rollouts")]

    def latest_gates(self, phases: Collection[str]) -> list[tuple[str, str]]:
        """(rollout id, gates as JSON text) of the newest gate sample of each rollout in one of `phases`."""
        rows = self.store.db.execute(
            f"""SELECT s.rollout_id, s.gates FROM rollout_gate_samples s JOIN rollouts r ON r.id = s.rollout_id
                WHERE r.phase IN ({",".join("?" * len(phases))})
                  AND s.at = (SELECT max(at) FROM rollout_gate_samples WHERE rollout_id = s.rollout_id)""",
            list(phases),
        )
        return [tuple(r) for r in rows]

    def round_totals(self) -> tuple[int, float]:
        """How many training rounds ran (the initial model's round 0 aside), and their seconds in all."""
        count, total = self.store.db.execute(
            "SELECT count(*), COALESCE(sum(seconds), 0) FROM fl_rounds WHERE round > 0"
        ).fetchone()
        return count, total

    def last_rounds(self) -> list[tuple[str, int, float, float | None]]:
        """(run, round, seconds, largest ε) of each run's latest round."""
        rows = self.store.db.execute(
            """SELECT run_id, round, seconds, epsilon_max FROM fl_rounds f
               WHERE round = (SELECT max(round) FROM fl_rounds WHERE run_id = f.run_id)"""
        )
        return [tuple(r) for r in rows]

    def max_lifetime_epsilon(self) -> float:
        """The largest lifetime ε any device has spent (0 before any): per device, the sum over its runs of its
        training ε and of its ε for each query purpose (the drift reference), as the ledger counts it."""
        (lifetime,) = self.store.db.execute(
            """SELECT COALESCE(max(total), 0) FROM (SELECT device_id, sum(eps) AS total FROM (
                 SELECT device_id, MAX(epsilon) AS eps FROM privacy_spend GROUP BY device_id, run_id
                 UNION ALL
                 SELECT device_id, MAX(epsilon) AS eps FROM privacy_query_spend GROUP BY device_id, run_id, purpose)
               GROUP BY device_id)"""
        ).fetchone()
        return float(lifetime)
