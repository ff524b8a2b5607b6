"""Release lifecycle records beyond publishing (the releases table itself is `Store.add_release`/`Store.release`):
which releases were retired, and who still needs a release before it may be.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from server.store import Store

__all__ = ["ReleaseRecords"]


class ReleaseRecords:
    """retired_releases, and the questions a retire asks of devices, assignments and rollouts."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def retired(self, release_id: str) -> dict[str, Any] | None:
        rows = list(self.store.db.query("SELECT * FROM retired_releases WHERE release_id = ?", [release_id]))
        return rows[0] if rows else None

    def all_retired(self) -> dict[str, int]:
        """release id -> when it was retired (ms)."""
        return {r[0]: int(r[1]) for r in self.store.db.execute("SELECT release_id, retired_at FROM retired_releases")}

    def mark_retired(self, release_id: str, at: int, actor: str) -> None:
        self.store.db.execute(
            "INSERT INTO retired_releases (release_id, retired_at, actor) VALUES (?, ?, ?)", [release_id, at, actor]
        )

    def devices_running(self, release_id: str, limit: int = 5) -> list[str]:
        sql = "SELECT id FROM devices WHERE running_release = ? ORDER BY id LIMIT ?"
        return [r[0] for r in self.store.db.execute(sql, [release_id, limit])]

    def devices_assigned(self, release_id: str, limit: int = 5) -> list[str]:
        """Devices whose newest assignment names the release."""
        sql = """SELECT a.device_id FROM assignments a WHERE a.release_id = ?
                   AND a.counter = (SELECT max(counter) FROM assignments b WHERE b.device_id = a.device_id)
                 ORDER BY a.device_id LIMIT ?"""
        return [r[0] for r in self.store.db.execute(sql, [release_id, limit])]

    def rollouts_needing(self, release_id: str, live_phases: Sequence[str]) -> list[tuple[str, str]]:
        """(rollout id, why) of live rollouts that roll the release out or could roll a device back to it."""
        phases = json.dumps(list(live_phases))
        sql = """SELECT id, 'rolls it out' FROM rollouts
                   WHERE release_id = ? AND phase IN (SELECT value FROM json_each(?))
                 UNION
                 SELECT DISTINCT r.id, 'could roll back to it' FROM rollouts r
                   JOIN rollout_devices rd ON rd.rollout_id = r.id
                   WHERE rd.previous_release = ? AND r.phase IN (SELECT value FROM json_each(?))
                 ORDER BY 1"""
        return [(r[0], r[1]) for r in self.store.db.execute(sql, [release_id, phases, release_id, phases])]
