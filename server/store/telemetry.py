"""Telemetry's records: the windows devices sent, each stored once under (device, sequence), and each device's
watermark. `server.ingest.telemetry` checks, confirms and pools; this module reads and writes. Writes join the
caller's transaction (`Store.transaction` nests), so a batch of windows and the watermarks they move commit
together.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from server.store import Store

__all__ = ["TelemetryRecords"]


def _last_inference(release: bool) -> str:
    """A subquery: the end of device d's newest window with an inference (of the release bound to it, if
    `release`). Newest by sequence, walking the device's primary key backwards from its last window, so it reads
    a few rows rather than the device's whole history (a device closes its windows in order)."""
    of_release = " AND t.release_id = ?" if release else ""
    return f"""SELECT t.end_ms FROM telemetry t WHERE t.device_id = d.id AND t.inferences > 0{of_release}
               ORDER BY t.sequence DESC LIMIT 1"""


class TelemetryRecords:
    """telemetry and telemetry_watermarks."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def watermark(self, device_id: str) -> int:
        row = self.store.db.execute(
            "SELECT watermark FROM telemetry_watermarks WHERE device_id = ?", [device_id]
        ).fetchone()
        return int(row[0]) if row else 0

    def set_watermark(self, device_id: str, watermark: int) -> None:
        self.store.db.execute(
            """INSERT INTO telemetry_watermarks (device_id, watermark) VALUES (?, ?)
               ON CONFLICT (device_id) DO UPDATE SET watermark = excluded.watermark""",
            [device_id, watermark],
        )

    def overlapping(self, device_id: str, first_sequence: int, sequence: int) -> list[tuple[int, int]]:
        """(first_sequence, sequence) of the stored windows of a device that overlap the range given."""
        rows = self.store.db.execute(
            "SELECT first_sequence, sequence FROM telemetry"
            " WHERE device_id = ? AND sequence >= ? AND first_sequence <= ?",
            [device_id, first_sequence, sequence],
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def insert(self, m: pb.TelemetryWindow, received_at: int, via: str) -> None:
        self.store.db.execute(
            """INSERT INTO telemetry (device_id, sequence, first_sequence, release_id, start_ms, end_ms,
                 inferences, errors, payload, received_at, via) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            [
                m.device_id,
                m.sequence,
                m.first_sequence,
                m.release_id,
                m.start_ms,
                m.end_ms,
                m.inferences,
                m.errors,
                m.SerializeToString(),
                received_at,
                via,
            ],
        )

    def ranges_after(self, device_id: str, sequence: int) -> Iterator[tuple[int, int]]:
        """(first_sequence, sequence) of a device's windows past a sequence, in order."""
        return self.store.db.execute(
            "SELECT first_sequence, sequence FROM telemetry WHERE device_id = ? AND sequence > ? ORDER BY sequence",
            [device_id, sequence],
        )

    def payloads(
        self, release_id: str, devices: list[str] | None = None, since_ms: int = 0, until_ms: int | None = None
    ) -> Iterator[tuple[str, bytes]]:
        """(device id, window as received) of one release's windows ending in a time range, of some devices."""
        sql = "SELECT device_id, payload FROM telemetry WHERE release_id = ? AND end_ms >= ?"
        args: list[Any] = [release_id, since_ms]
        if until_ms is not None:
            sql += " AND end_ms <= ?"
            args.append(until_ms)
        if devices is not None:
            sql += f" AND device_id IN ({','.join('?' * len(devices))})"
            args += devices
        return self.store.db.execute(sql, args)

    def windows(self) -> list[dict[str, Any]]:
        """Every stored window's device, end and payload (as received), oldest end first."""
        return list(self.store.db.query("SELECT device_id, end_ms, payload FROM telemetry ORDER BY end_ms"))

    def releases_since(self, since_ms: int) -> list[str]:
        """The releases with windows that ended at or after a time."""
        return [
            r[0]
            for r in self.store.db.execute("SELECT DISTINCT release_id FROM telemetry WHERE end_ms >= ?", [since_ms])
        ]

    def last_inference_ms(self, devices: list[str], release_id: str | None = None) -> dict[str, int]:
        """Per device, the end of its newest window with at least one inference (of one release, if given);
        devices with none are absent."""
        if not devices:
            return {}
        sql = f"""SELECT d.id, ({_last_inference(release_id is not None)})
                  FROM devices d WHERE d.id IN ({",".join("?" * len(devices))})"""
        args = ([] if release_id is None else [release_id]) + list(devices)
        return {r[0]: int(r[1]) for r in self.store.db.execute(sql, args) if r[1] is not None}

    def stale_data_devices(self, cutoff_ms: int) -> list[dict[str, Any]]:
        """Registered devices whose newest window with an inference ended before `cutoff_ms` (or that sent none and
        registered before it): their inference count stayed at zero since. Each with its fleet and that time."""
        return list(
            self.store.db.query(
                f"""SELECT device_id, fleet, last_inference_ms FROM (
                     SELECT d.id AS device_id, d.fleet AS fleet, d.registered_at AS registered_at,
                       ({_last_inference(False)}) AS last_inference_ms
                     FROM devices d)
                   WHERE COALESCE(last_inference_ms, registered_at) < ? ORDER BY fleet, device_id""",
                [cutoff_ms],
            )
        )

    def payloads_since(self, since_ms: int, device_id: str | None = None) -> Iterator[tuple[str, bytes]]:
        """(device id, window as received) of the windows ending at or after a time, of every device or one."""
        if device_id is None:
            return self.store.db.execute("SELECT device_id, payload FROM telemetry WHERE end_ms >= ?", [since_ms])
        return self.store.db.execute(
            "SELECT device_id, payload FROM telemetry WHERE device_id = ? AND end_ms >= ?", [device_id, since_ms]
        )
