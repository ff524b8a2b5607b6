"""What the caller of a training run learns after each round: `RoundProgress`.

The ServerApp records each round as a row of fl_rounds (server/fl/registry.py, TrainingRuns) and its incidents in
fl_incidents; a progress is that row with the round's incidents. Nothing here imports torch or Flower: the caller
of a simulated run (`fedfleet train`) reads the rows from the store while the run goes on in Flower's processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["RoundProgress"]


@dataclass(frozen=True)
class RoundProgress:
    run_id: str
    round: int
    rounds: int
    selected: int
    completed: int
    refused: int
    failed: int
    train_loss: float | None
    test_loss: float
    test_accuracy: float
    epsilon_max: float | None
    seconds: float
    incidents: list[dict[str, str]]

    @classmethod
    def from_records(
        cls, run_id: str, rounds: int, row: Mapping[str, Any], incidents: Iterable[Mapping[str, Any]]
    ) -> RoundProgress:
        """A progress from its fl_rounds row and the run's fl_incidents rows (those of other rounds left out)."""
        return cls(
            run_id=run_id,
            round=row["round"],
            rounds=rounds,
            selected=row["selected"],
            completed=row["completed"],
            refused=row["refused"],
            failed=row["failed"],
            train_loss=row["train_loss"],
            test_loss=row["test_loss"],
            test_accuracy=row["test_accuracy"],
            epsilon_max=row["epsilon_max"],
            seconds=row["seconds"],
            incidents=[
                {"device": i["device_id"], "kind": i["kind"], "detail": i["detail"]}
                for i in incidents
                if i["round"] == row["round"]
            ],
        )
