"""Rollouts' records: each rollout's state, its devices by wave, its decisions and its gate values over time.
`server.rollout.engine` decides and `server.rollout.driver` applies; this module reads and writes. Writes join
the caller's transaction (`Store.transaction` nests), so a transition's assignments, new state, decision and
audit entry commit together.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from server.store import Store

__all__ = ["RolloutRecords"]


def _marks(values: Collection[Any]) -> str:
    return ",".join("?" * len(values))


class RolloutRecords:
    """rollouts, rollout_devices, rollout_decisions and rollout_gate_samples."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # ----- rollouts -----

    def insert(self, rollout_id: str, release_id: str, spec: str, phase: str, at: int) -> None:
        """A new rollout (spec as JSON) in `phase`, before its canary (wave -1)."""
        self.store.db.execute(
            """INSERT INTO rollouts (id, release_id, spec, phase, wave, wave_started_ms, created_at, updated_at)
               VALUES (?, ?, ?, ?, -1, ?, ?, ?)""",
            [rollout_id, release_id, spec, phase, at, at, at],
        )

    def count(self) -> int:
        return int(self.store.db.execute("SELECT count(*) FROM rollouts").fetchone()[0])

    def get(self, rollout_id: str) -> dict[str, Any] | None:
        rows = list(self.store.db.query("SELECT * FROM rollouts WHERE id = ?", [rollout_id]))
        return rows[0] if rows else None

    def all(self, phases: Collection[str] | None = None) -> list[dict[str, Any]]:
        """Every rollout (only those in `phases`, if given), oldest first."""
        sql = "SELECT * FROM rollouts"
        if phases is not None:
            sql += f" WHERE phase IN ({_marks(phases)})"
        return list(self.store.db.query(sql + " ORDER BY created_at, id", list(phases or [])))

    def version(self, rollout_id: str) -> tuple[str, int, int] | None:
        """(phase, wave, updated_at): what tells whether a rollout changed since it was read."""
        row = self.store.db.execute(
            "SELECT phase, wave, updated_at FROM rollouts WHERE id = ?", [rollout_id]
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def set_state(
        self,
        rollout_id: str,
        phase: str,
        wave: int,
        wave_started_ms: int,
        paused_from: str,
        last_decision: str,
        updated_at: int,
    ) -> None:
        self.store.db.execute(
            """UPDATE rollouts SET phase = ?, wave = ?, wave_started_ms = ?, paused_from = ?, last_decision = ?,
                 updated_at = ? WHERE id = ?""",
            [phase, wave, wave_started_ms, paused_from, last_decision, updated_at, rollout_id],
        )

    # ----- rollout_devices -----

    def add_devices(self, rollout_id: str, devices: Sequence[tuple[str, int, str]]) -> None:
        """(device id, wave, previous release) of each device the rollout takes."""
        self.store.db.conn.executemany(
            "INSERT INTO rollout_devices (rollout_id, device_id, wave, previous_release) VALUES (?, ?, ?, ?)",
            [(rollout_id, d, wave, previous) for d, wave, previous in devices],
        )

    def wave_count(self, rollout_id: str) -> int:
        row = self.store.db.execute(
            "SELECT count(DISTINCT wave) FROM rollout_devices WHERE rollout_id = ?", [rollout_id]
        ).fetchone()
        return int(row[0])

    def outcomes(self, rollout_id: str, failure_kinds: Sequence[str]) -> list[dict[str, Any]]:
        """Each device of the rollout with its assignments, what it runs, its labels (JSON) and whether it sent
        one of `failure_kinds` for its assignment (`failed`)."""
        return list(
            self.store.db.query(
                f"""SELECT rd.device_id, rd.counter, rd.assigned_at, rd.rollback_counter, rd.previous_release,
                      d.running_release, d.running_counter, d.labels,
                      EXISTS (SELECT 1 FROM events e WHERE e.device_id = rd.device_id AND e.counter = rd.counter
                              AND e.kind IN ({_marks(failure_kinds)})) AS failed
                    FROM rollout_devices rd JOIN devices d ON d.id = rd.device_id
                    WHERE rd.rollout_id = ?""",
                [*failure_kinds, rollout_id],
            )
        )

    def wave_devices(self, rollout_id: str, wave: int) -> list[dict[str, Any]]:
        """A wave's devices: their assignments, previous release, what they run and whether they are online."""
        return list(
            self.store.db.query(
                """SELECT rd.counter, rd.rollback_counter, rd.previous_release, d.running_release, d.running_counter,
                          d.online FROM rollout_devices rd JOIN devices d ON d.id = rd.device_id
                   WHERE rd.rollout_id = ? AND rd.wave = ?""",
                [rollout_id, wave],
            )
        )

    def unassigned(self, rollout_id: str, wave: int) -> list[str]:
        """The devices of a wave not assigned the rollout's release yet."""
        return [
            r["device_id"]
            for r in self.store.db.query(
                "SELECT device_id FROM rollout_devices WHERE rollout_id = ? AND wave = ? AND counter IS NULL",
                [rollout_id, wave],
            )
        ]

    def mark_assigned(self, rollout_id: str, counters: Sequence[tuple[str, int]], at: int) -> None:
        """(device id, counter) of the assignments to the rollout's release just issued."""
        self.store.db.conn.executemany(
            "UPDATE rollout_devices SET counter = ?, assigned_at = ? WHERE rollout_id = ? AND device_id = ?",
            [(counter, at, rollout_id, d) for d, counter in counters],
        )

    def to_roll_back(self, rollout_id: str) -> list[tuple[str, str]]:
        """(device id, previous release) of the assigned devices not given their rollback assignment yet."""
        return [
            (r["device_id"], r["previous_release"])
            for r in self.store.db.query(
                "SELECT device_id, previous_release FROM rollout_devices"
                " WHERE rollout_id = ? AND counter IS NOT NULL AND rollback_counter IS NULL",
                [rollout_id],
            )
        ]

    def mark_rolled_back(self, rollout_id: str, counters: Sequence[tuple[str, int]]) -> None:
        """(device id, counter) of the rollback assignments just issued."""
        self.store.db.conn.executemany(
            "UPDATE rollout_devices SET rollback_counter = ? WHERE rollout_id = ? AND device_id = ?",
            [(counter, rollout_id, d) for d, counter in counters],
        )

    def busy(self, device_ids: Sequence[str], phases: Collection[str]) -> dict[str, str]:
        """Of these devices, those in a rollout in one of `phases` → that rollout's id."""
        busy: dict[str, str] = {}
        for chunk in range(0, len(device_ids), 500):
            part = list(device_ids[chunk : chunk + 500])
            for r in self.store.db.query(
                f"""SELECT rd.device_id, rd.rollout_id FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id
                    WHERE r.phase IN ({_marks(phases)}) AND rd.device_id IN ({_marks(part)})""",
                [*phases, *part],
            ):
                busy[r["device_id"]] = r["rollout_id"]
        return busy

    # ----- decisions and gate samples -----

    def add_decision(self, rollout_id: str, wave: int, at: int, decision: str, reason: str, gates: str) -> None:
        """One decision with its gates (JSON)."""
        self.store.db.execute(
            "INSERT INTO rollout_decisions (rollout_id, wave, at, decision, reason, gates) VALUES (?, ?, ?, ?, ?, ?)",
            [rollout_id, wave, at, decision, reason, gates],
        )

    def decisions(self, rollout_id: str) -> list[dict[str, Any]]:
        """Every decision of a rollout, oldest first, its gates still JSON text."""
        return list(
            self.store.db.query(
                "SELECT wave, at, decision, reason, gates FROM rollout_decisions WHERE rollout_id = ? ORDER BY id",
                [rollout_id],
            )
        )

    def add_gate_sample(self, rollout_id: str, wave: int, at: int, gates: str) -> None:
        """A wave's gate values (JSON) at one time, for the charts over time."""
        self.store.db.execute(
            "INSERT INTO rollout_gate_samples (rollout_id, wave, at, gates) VALUES (?, ?, ?, ?)",
            [rollout_id, wave, at, gates],
        )
