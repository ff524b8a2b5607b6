"""The device's telemetry outbox: windows wait here (SQLite, on the device) until the coordinator confirms them.

- Each window gets the next per-device sequence number when it is stored, before anything is sent.
- Only an acknowledgement (the coordinator's stored watermark) deletes windows: nothing is lost to a broker
  outage, a coordinator restart or an agent killed mid-send. An acknowledgement above the highest sequence this
  device has sent (a forged or stale retained ack) is ignored: it deletes nothing, not even windows sent but not
  yet stored.
- Size cap policy: past `cap` windows, the two oldest adjacent windows of one release that were never sent are
  summarized into one (counts added, covering both sequence numbers; time resolution is lost, no count is), as
  long as a summary spans at most `LIMITS.telemetry_summary_span` sequence numbers: the coordinator refuses wider
  ones, and any sequence beyond what an outbox can hold (`LIMITS.outbox_cap` summaries of that span).
  Sent windows are never merged, so a resend is byte-identical and the coordinator's idempotence holds. If no
  pair can be merged the outbox grows past the cap rather than drop anything, and says so in the log.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import threading
from pathlib import Path

from edge_agent.contract import LIMITS
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.windows import ClosedWindow, counts_from_proto, window_to_proto

__all__ = ["Outbox"]

logger = logging.getLogger(__name__)


class Outbox:
    def __init__(self, path: Path, device_id: str, cap: int = 5000) -> None:
        if cap < 2:
            raise ValueError("the outbox cap must be at least 2 windows")
        self.device_id = device_id
        self.cap = cap
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a stored window survives power loss
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS windows (
                sequence INTEGER PRIMARY KEY,
                first_sequence INTEGER NOT NULL,
                release_id TEXT NOT NULL,
                payload BLOB NOT NULL,
                sent INTEGER NOT NULL DEFAULT 0
            );
            CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
            INSERT OR IGNORE INTO counters VALUES ('next_sequence', 1), ('acknowledged', 0);
            """
        )
        self._count = self._db.execute("SELECT count(*) FROM windows").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _counter(self, name: str) -> int:
        return int(self._db.execute("SELECT value FROM counters WHERE name = ?", [name]).fetchone()[0])

    def append(self, window: ClosedWindow) -> int:
        """Store a closed window under the next sequence number; returns that number."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._counter("next_sequence")
                msg = window_to_proto(window, self.device_id, seq)
                self._db.execute(
                    "INSERT INTO windows (sequence, first_sequence, release_id, payload) VALUES (?, ?, ?, ?)",
                    [seq, seq, window.release_id, msg.SerializeToString()],
                )
                self._db.execute("UPDATE counters SET value = ? WHERE name = 'next_sequence'", [seq + 1])
                self._enforce_cap()
                self._db.execute("COMMIT")
                self._count = self._db.execute("SELECT count(*) FROM windows").fetchone()[0]
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return seq

    def _enforce_cap(self) -> None:
        while self._db.execute("SELECT count(*) FROM windows").fetchone()[0] > self.cap:
            rows = self._db.execute(
                "SELECT sequence, first_sequence, release_id, payload FROM windows WHERE sent = 0 ORDER BY sequence"
            ).fetchall()
            pair = next(
                (
                    (a, b)
                    for a, b in itertools.pairwise(rows)
                    if a[2] == b[2] and b[1] == a[0] + 1 and b[0] - a[1] < LIMITS.telemetry_summary_span
                ),
                None,
            )
            if pair is None:
                logger.warning(
                    "telemetry outbox holds %d windows, over its cap of %d, and none can be summarized",
                    self._db.execute("SELECT count(*) FROM windows").fetchone()[0],
                    self.cap,
                )
                return
            older, newer = (pb.TelemetryWindow.FromString(r[3]) for r in pair)
            merged = counts_from_proto(older).merge(counts_from_proto(newer))
            summary = window_to_proto(
                ClosedWindow(older.release_id, older.start_ms, newer.end_ms, merged),
                self.device_id,
                newer.sequence,
                first_sequence=older.first_sequence,
            )
            self._db.execute("DELETE FROM windows WHERE sequence = ?", [older.sequence])
            self._db.execute(
                "UPDATE windows SET first_sequence = ?, payload = ? WHERE sequence = ?",
                [older.first_sequence, summary.SerializeToString(), newer.sequence],
            )

    def pending(self, limit: int = 100) -> list[tuple[int, bytes]]:
        """Unconfirmed windows, oldest first, as (sequence, serialized TelemetryWindow)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sequence, payload FROM windows ORDER BY sequence LIMIT ?", [limit]
            ).fetchall()
        return [(int(s), bytes(p)) for s, p in rows]

    def mark_sent(self, sequences: list[int]) -> None:
        with self._lock:
            self._db.executemany("UPDATE windows SET sent = 1 WHERE sequence = ?", [(s,) for s in sequences])

    def acknowledge(self, watermark: int) -> int:
        """The coordinator has stored everything up to `watermark`: forget it. Returns windows deleted."""
        with self._lock:
            row = self._db.execute("SELECT max(sequence) FROM windows WHERE sent = 1").fetchone()
            sent = max(self._counter("acknowledged"), int(row[0] or 0))
            if watermark > sent:  # forged, or from another life of this device: it proves nothing was stored
                logger.warning("acknowledgement of %d is beyond the last window sent (%d): ignored", watermark, sent)
                return 0
            deleted = self._db.execute("DELETE FROM windows WHERE sequence <= ?", [watermark]).rowcount
            self._count -= deleted
            self._db.execute("UPDATE counters SET value = max(value, ?) WHERE name = 'acknowledged'", [watermark])
            return int(deleted)

    def __len__(self) -> int:
        """Windows not yet confirmed (kept in memory: no query)."""
        return int(self._count)

    @property
    def acknowledged(self) -> int:
        with self._lock:
            return self._counter("acknowledged")
