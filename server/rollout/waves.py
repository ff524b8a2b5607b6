"""One wave numbering for every view of a rollout (CLI, dashboard, reports): the canary, then wave 1 … N.

A rollout stores its position as an index: -1 before the canary is assigned, 0 for the canary, k ≥ 1 for the
k-th wave after it. `count` is how many waves the plan holds, the canary included, so a plan of a canary and two
waves has count 3 and its last wave reads "wave 2 of 2".
"""

from __future__ import annotations

__all__ = ["NOT_STARTED", "wave_label"]

NOT_STARTED = "not started"


def wave_label(index: int | None, count: int) -> str:
    """The name of wave `index` of a plan of `count` waves: "not started" (index None or < 0), "canary" (0),
    "wave k of N" (k ≥ 1; N = count - 1, the waves after the canary)."""
    if index is None or index < 0:
        return NOT_STARTED
    if index == 0:
        return "canary"
    return f"wave {index} of {max(count - 1, index)}"
