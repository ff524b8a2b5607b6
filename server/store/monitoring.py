"""The monitoring ledger: ε each device spent on noised telemetry windows (agent.toml [telemetry]
dp_epsilon_per_window), charged against the device's monitoring budget, apart from the training privacy ledger
(server/store/training.py). `server.ingest.telemetry` records a row per noised window it stores, in the
transaction that stores the window; this module reads and writes.

A device's spend, as the coordinator counts it, is the sum of the ε of the windows it stored; the device's own
figure (`device_spent`, cumulative, in every noised window) rides beside it, and the newest window says whether
the device's budget is spent: then its windows stopped on purpose, not because it went silent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edge_agent.contract.drift import WindowNoise
from server.store import Store

__all__ = ["MonitoringLedger", "MonitoringSpend"]


@dataclass(frozen=True)
class MonitoringSpend:
    """One device's monitoring budget as the coordinator knows it."""

    device_id: str
    windows: int  # noised windows stored (budget-spent markers not counted)
    epsilon: float  # the sum of their ε: what the coordinator saw spent
    device_spent: float  # the device's own cumulative figure, from its newest window
    device_budget: float  # the device's budget, from its newest window
    exhausted: bool  # the newest window says the device sends no more noised windows
    last_sequence: int
    last_received_at: int  # epoch ms: when the coordinator stored the device's newest noised window (or marker)

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device_id,
            "windows": self.windows,
            "epsilon": self.epsilon,
            "device_spent": self.device_spent,
            "device_budget": self.device_budget,
            "remaining": max(0.0, self.device_budget - self.device_spent),
            "exhausted": self.exhausted,
            "last_sequence": self.last_sequence,
            "last_received_at": self.last_received_at,
        }


class MonitoringLedger:
    """monitoring_spend."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def record(
        self,
        device_id: str,
        first_sequence: int,
        sequence: int,
        release_id: str,
        noise: WindowNoise,
        received_at: int,
    ) -> None:
        """One stored noised window (or budget-spent marker); joins the caller's transaction."""
        self.store.db.execute(
            """INSERT INTO monitoring_spend (device_id, sequence, first_sequence, release_id, epsilon, noise_scale,
                 device_spent, device_budget, exhausted, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            [
                device_id,
                sequence,
                first_sequence,
                release_id,
                noise.epsilon,
                noise.scale,
                noise.spent_epsilon,
                noise.budget_epsilon,
                int(noise.exhausted),
                received_at,
            ],
        )

    def spends(self, device_id: str | None = None) -> list[MonitoringSpend]:
        """Per device (or one device), its monitoring spend; devices that never sent a noised window are absent."""
        rows = self.store.db.execute(
            """SELECT s.device_id, sum(s.epsilon > 0), total(s.epsilon), n.device_spent, n.device_budget,
                      n.exhausted, n.sequence, max(s.received_at)
               FROM monitoring_spend s
               JOIN monitoring_spend n ON n.device_id = s.device_id
                 AND n.sequence = (SELECT max(sequence) FROM monitoring_spend WHERE device_id = s.device_id)
               WHERE ? IS NULL OR s.device_id = ?
               GROUP BY s.device_id ORDER BY s.device_id""",
            [device_id, device_id],
        )
        return [
            MonitoringSpend(r[0], int(r[1]), float(r[2]), float(r[3]), float(r[4]), bool(r[5]), int(r[6]), int(r[7]))
            for r in rows
        ]
