"""Consent records (schema v13): each statement of a device's consent to a purpose, with its time and source,
appended and never changed (the newest is the device's consent now); and per training run, each greeted device's
consent as the run saw it. Writes join the caller's transaction.

Sources: "agent" (the owner's agent.toml `[consent]`, reported when the agent registers) or "user:NAME" (a person
recording it on the coordinator). A statement equal to the device's current one is not recorded again.
"""

from __future__ import annotations

from typing import Any

from server.store import Store, now_ms

__all__ = ["PURPOSES", "ConsentRecords"]

PURPOSES = ("training",)  # what a device's data may be used for, each consented to on its own

# Each device's newest statement for a purpose (the purpose is the query's first parameter): its consent now.
_NEWEST = """WITH newest AS (SELECT c.* FROM consent c JOIN (SELECT device_id, max(id) AS id FROM consent
               WHERE purpose = ? GROUP BY device_id) latest ON latest.id = c.id)"""


class ConsentRecords:
    def __init__(self, store: Store) -> None:
        self.store = store

    def record(self, device_id: str, purpose: str, granted: bool, source: str, at: int | None = None) -> bool:
        """Record a statement; False (and nothing written) when it repeats the device's current one."""
        if purpose not in PURPOSES:
            raise ValueError(f"unknown consent purpose {purpose!r} (known: {', '.join(PURPOSES)})")
        current = self.current(device_id, purpose)
        if current is not None and bool(current["granted"]) == granted:
            return False
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO consent (device_id, purpose, granted, source, recorded_at) VALUES (?, ?, ?, ?, ?)",
                [device_id, purpose, int(granted), source, now_ms() if at is None else at],
            )
        return True

    def current(self, device_id: str, purpose: str = "training") -> dict[str, Any] | None:
        rows = list(
            self.store.db.query(
                "SELECT * FROM consent WHERE device_id = ? AND purpose = ? ORDER BY id DESC LIMIT 1",
                [device_id, purpose],
            )
        )
        return _row(rows[0]) if rows else None

    def all_current(self, purpose: str = "training") -> dict[str, dict[str, Any]]:
        """Every device's current statement for a purpose, by device."""
        rows = self.store.db.query(f"{_NEWEST} SELECT * FROM newest ORDER BY device_id", [purpose])
        return {r["device_id"]: _row(r) for r in rows}

    def roster(self, purpose: str = "training") -> list[dict[str, Any]]:
        """Every device the coordinator knows of, by id: each registered device and each with a statement recorded
        (a device can be stated for before it first registers), whether it has registered, and its current
        statement for a purpose (None: none recorded). What `fedfleet privacy consent` lists."""
        rows = self.store.db.query(
            f"""{_NEWEST}
                SELECT known.device_id, known.registered, newest.id, newest.purpose, newest.granted, newest.source,
                       newest.recorded_at
                FROM (SELECT id AS device_id, 1 AS registered FROM devices
                      UNION ALL SELECT device_id, 0 FROM newest WHERE device_id NOT IN (SELECT id FROM devices)) known
                LEFT JOIN newest ON newest.device_id = known.device_id ORDER BY known.device_id""",
            [purpose],
        )
        return [
            {
                "device_id": r["device_id"],
                "registered": bool(r["registered"]),
                "statement": None if r["id"] is None else _row({k: v for k, v in r.items() if k != "registered"}),
            }
            for r in rows
        ]

    def history(self, device_id: str) -> list[dict[str, Any]]:
        """A device's statements, oldest first."""
        return [
            _row(r) for r in self.store.db.query("SELECT * FROM consent WHERE device_id = ? ORDER BY id", [device_id])
        ]

    def record_run(self, run_id: str, device_id: str, granted: bool, consent_id: int | None) -> None:
        """A greeted device's consent as a training run saw it (once per run and device)."""
        self.store.db.execute(
            """INSERT INTO fl_run_consent (run_id, device_id, granted, consent_id) VALUES (?, ?, ?, ?)
               ON CONFLICT (run_id, device_id) DO NOTHING""",
            [run_id, device_id, int(granted), consent_id],
        )

    def of_run(self, run_id: str) -> list[dict[str, Any]]:
        """Each greeted device of a run with its consent then and the statement it rested on (NULL: none)."""
        return [
            {**r, "granted": bool(r["granted"])}
            for r in self.store.db.query(
                """SELECT r.device_id, r.granted, c.source, c.recorded_at FROM fl_run_consent r
                   LEFT JOIN consent c ON c.id = r.consent_id WHERE r.run_id = ? ORDER BY r.device_id""",
                [run_id],
            )
        ]

    def by_run(self) -> dict[tuple[str, str], bool]:
        """(run, device) -> whether the device had consented to that run."""
        rows = self.store.db.execute("SELECT run_id, device_id, granted FROM fl_run_consent")
        return {(r[0], r[1]): bool(r[2]) for r in rows}


def _row(r: dict[str, Any]) -> dict[str, Any]:
    return {**r, "granted": bool(r["granted"])}
