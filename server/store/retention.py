"""Retention's records: which telemetry windows, update events and training incidents are old enough to go, and
deleting them a batch at a time.

What is never deleted here: the audit trail and the privacy ledger (not touched at all; the ledger's own triggers
refuse it anyway), telemetry and events of a release that a live rollout judges or could roll back to (its
gates pool the release's windows and read its devices' events), and the incidents of a training that is still
running. Age is the coordinator's clock (`received_at`, `at`), never a device's.

Each batch is found by a read that walks the table in rowid order from where the last batch ended (old rows
come first, so a batch costs about its own size), then deleted by rowid in a short transaction of its own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from server.store import Store

__all__ = ["PRUNABLE", "RetentionRecords"]


@dataclass(frozen=True)
class _Table:
    name: str
    key: str  # the row id to delete by
    age: str  # the coordinator's time the row arrived, ms
    keep: str  # a condition on the row that keeps it whatever its age (uses the protected releases/runs)


# The only tables retention touches, each with what keeps a row of it.
PRUNABLE: dict[str, _Table] = {
    "telemetry": _Table("telemetry", "rowid", "received_at", "release_id IN (SELECT id FROM _protected_releases)"),
    "events": _Table("events", "id", "received_at", "release_id IN (SELECT id FROM _protected_releases)"),
    "fl_incidents": _Table(
        "fl_incidents", "rowid", "at", "run_id IN (SELECT id FROM fl_runs WHERE status = 'running')"
    ),
}

_PROTECTED = """_protected_releases (id) AS (
    SELECT release_id FROM rollouts WHERE phase IN (SELECT value FROM json_each(?))
    UNION SELECT rd.previous_release FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id
          WHERE r.phase IN (SELECT value FROM json_each(?)))"""


class RetentionRecords:
    """Counting and deleting old rows of the PRUNABLE tables; `live_phases` are the phases of a rollout that is
    still running (server.rollout.driver.ACTIVE_PHASES)."""

    def __init__(self, store: Store, live_phases: Sequence[str]) -> None:
        self.store = store
        self._phases = json.dumps(list(live_phases))

    def protected_releases(self) -> list[str]:
        """Releases whose telemetry and events are kept: those of live rollouts and what they could roll back to."""
        rows = self.store.db.execute(f"WITH {_PROTECTED} SELECT id FROM _protected_releases ORDER BY id", self._args())
        return [r[0] for r in rows]

    def count_expired(self, table: str, cutoff_ms: int) -> int:
        """Rows of `table` older than `cutoff_ms` that retention may delete."""
        t = PRUNABLE[table]
        sql = f"WITH {_PROTECTED} SELECT count(*) FROM {t.name} WHERE {t.age} < ? AND NOT ({t.keep})"
        return int(self.store.db.execute(sql, [*self._args(), cutoff_ms]).fetchone()[0])

    def next_batch(self, table: str, cutoff_ms: int, after: int, limit: int) -> list[int]:
        """Up to `limit` ids of deletable rows past id `after`, in id order (a read: no write lock)."""
        t = PRUNABLE[table]
        sql = (
            f"WITH {_PROTECTED} SELECT {t.key} FROM {t.name}"
            f" WHERE {t.key} > ? AND {t.age} < ? AND NOT ({t.keep}) ORDER BY {t.key} LIMIT ?"
        )
        return [int(r[0]) for r in self.store.db.execute(sql, [*self._args(), after, cutoff_ms, limit])]

    def delete(self, table: str, ids: Sequence[int], cutoff_ms: int) -> int:
        """Delete these rows in one transaction, checking again that each is still deletable; returns how many."""
        if not ids:
            return 0
        t = PRUNABLE[table]
        sql = (
            f"WITH {_PROTECTED} DELETE FROM {t.name} WHERE {t.key} IN ({','.join('?' * len(ids))})"
            f" AND {t.age} < ? AND NOT ({t.keep})"
        )
        with self.store.transaction() as db:
            db.execute(sql, [*self._args(), *ids, cutoff_ms])
            # changes(), not rowcount: Python's sqlite3 reports -1 for a statement that starts with WITH
            return int(db.execute("SELECT changes()").fetchone()[0])

    def _args(self) -> list[str]:
        return [self._phases, self._phases]
