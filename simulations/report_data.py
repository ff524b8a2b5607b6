"""What a rehearsal report plots, computed from the coordinator's state (the pixels are simulations/report.py's).

Drift over time: the stored telemetry windows pooled into fixed time buckets on the run's own clock (seconds
since the run started, the origin of the devices-per-release plot too), each bucket scored as the largest feature
PSI against a release's drift reference. Two rules keep a point from showing drift that is not there:

- A point is scored only from at least `MIN_BUCKET_SAMPLES` inputs: a bucket with fewer is pooled with the next
  ones until they hold enough (the point sits in the middle of the span). PSI over few samples measures
  sampling noise, and the largest of 64 features' PSI its worst case: with 50 inputs over 10 bins a feature has
  an empty bin now and then, and an empty bin alone adds about 0.69 (its reference share 0.1 against the floor
  1e-4), so the largest feature PSI of unchanged inputs sat near 0.85 in the small buckets (50 inputs were
  enough before) that a rollback or the end of a run leaves.
- The last bucket is left out when the data ends inside it (a partial bucket holds fewer inputs, so more
  noise, and ended every series with an upward tick that the summary's pooled reading contradicted).

Moments: when the loop's decisions happened (the fault, the drift alarm, the retraining, the rollout's waves), on
the same clock, so plots can mark them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.drift import DriftReference, WindowCounts, score_window
from edge_agent.contract.windows import counts_from_proto

__all__ = [
    "BUCKET_SECONDS",
    "MIN_BUCKET_SAMPLES",
    "Moment",
    "Series",
    "bucketed_drift",
    "decision_moments",
    "loop_moments",
    "references_of",
]

BUCKET_SECONDS = 2.0
# Inputs a point needs before its PSI is plotted: with 10 bins a feature's PSI of unchanged inputs is about 9/n
# (0.018 at 500), the largest of 64 features a few times that, well below the 0.25 gates.
MIN_BUCKET_SAMPLES = 500

Series = dict[str, list[tuple[float, float]]]


@dataclass(frozen=True)
class Moment:
    """Something that happened at `seconds` since the run started: `kind` picks its marker, `label` says what."""

    seconds: float
    kind: str  # fault | alarm | retrain | rollout | hold | rollback | rolled back | completed
    label: str


def references_of(releases: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, DriftReference]:
    """Each release's drift reference from its (id, custom metadata); releases without one are left out."""
    return {
        release: DriftReference.from_metadata(custom["drift_reference"])
        for release, custom in releases
        if "drift_reference" in custom
    }


def bucketed_drift(
    windows: Iterable[Mapping[str, Any]],
    group_of: Callable[[Mapping[str, Any]], str | None],
    reference_of: Callable[[str], DriftReference | None],
    origin_ms: int,
    bucket_seconds: float = BUCKET_SECONDS,
    min_samples: int = MIN_BUCKET_SAMPLES,
) -> Series:
    """Largest feature PSI per group (a site, a release) and time bucket: [(bucket middle in seconds since
    `origin_ms`, PSI)], oldest first. `windows` are stored telemetry rows (end_ms, payload and what `group_of`
    reads); a row whose group is None, or whose group has no reference or another feature shape, is skipped.
    A bucket with fewer than `min_samples` inputs is pooled with the group's next ones (the point then sits in the
    middle of their span); the last bucket, which the data ends inside, is left out, and so is a span that never
    gathered enough."""
    buckets: dict[tuple[str, int], WindowCounts] = {}
    last_ms = origin_ms
    for row in windows:
        group = group_of(row)
        reference = None if group is None else reference_of(group)
        if group is None or reference is None:
            continue
        counts = counts_from_proto(pb.TelemetryWindow.FromString(row["payload"]))
        if counts.feature_counts.shape != reference.feature_proportions.shape:
            continue
        end_ms = int(row["end_ms"])
        last_ms = max(last_ms, end_ms)
        key = (group, math.floor((end_ms - origin_ms) / 1000 / bucket_seconds))
        buckets[key] = counts if key not in buckets else buckets[key].merge(counts)
    # The bucket the data ends in is complete only if the data reached its end.
    last_bucket = math.floor((last_ms - origin_ms) / 1000 / bucket_seconds)
    series: Series = {}
    pending: dict[str, tuple[int, WindowCounts]] = {}  # per group: the first bucket of a span still too small
    for (group, b), bucket in sorted(buckets.items()):
        if b == last_bucket:
            continue
        first, counts = b, bucket
        if group in pending:
            first, held = pending.pop(group)
            counts = held.merge(bucket)
        reference = reference_of(group)
        assert reference is not None
        score = score_window(counts, reference, min_samples=min_samples)
        if score is None:
            pending[group] = (first, counts)
            continue
        middle = (first + b + 1) / 2 * bucket_seconds
        series.setdefault(group, []).append((middle, float(np.max(score.feature_psi))))
    return series


def _at_ms(decision: Mapping[str, Any]) -> int:
    return int(decision.get("at_ms", decision.get("at", 0)))


def decision_moments(rollouts: Iterable[Mapping[str, Any]], origin_ms: int) -> list[Moment]:
    """A rollout's start and its decisive moments (each wave advanced, held, rolled back, completed)."""
    marked = {"start": "rollout", "advance": "rollout", "hold": "hold", "rollback": "rollback"}
    marked |= {"completed": "completed", "rolled_back": "rolled back"}
    moments = []
    for r in rollouts:
        for d in r.get("decisions", []):
            kind = marked.get(str(d["decision"]))
            if kind is not None:
                label = f"{r.get('id', 'rollout')} {d['decision']}"
                moments.append(Moment((_at_ms(d) - origin_ms) / 1000, kind, label))
    return sorted(moments, key=lambda m: m.seconds)


def loop_moments(
    origin_ms: int,
    fault_seconds: float | None,
    alarm: Mapping[str, Any] | None,
    job: Mapping[str, Any] | None,
    rollout: Mapping[str, Any] | None,
) -> list[Moment]:
    """The closed loop's moments: the sensors' fault, the drift alarm, the retraining, the rollout."""
    moments = []
    if fault_seconds is not None:
        moments.append(Moment(fault_seconds, "fault", "sensor fault"))
    if alarm is not None:
        moments.append(Moment((int(alarm["opened_at"]) - origin_ms) / 1000, "alarm", "drift alarm"))
    if job is not None:
        moments.append(Moment((int(job["created_at"]) - origin_ms) / 1000, "retrain", "retraining"))
    if rollout:
        moments += decision_moments([rollout], origin_ms)
    return sorted(moments, key=lambda m: m.seconds)
