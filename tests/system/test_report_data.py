"""What the rehearsal reports plot (simulations/report_data.py): drift per time bucket on the run's clock, with
no drift drawn from sampling noise or a partial last bucket, and the loop's moments on the same clock."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.drift import DriftReference, WindowCounts, score_window
from edge_agent.contract.windows import ClosedWindow, counts_from_proto, window_to_proto
from simulations.report_data import (
    MIN_BUCKET_SAMPLES,
    Moment,
    bucketed_drift,
    decision_moments,
    loop_moments,
    references_of,
)

FEATURES, CLASSES = 64, 10
ORIGIN_MS = 1_700_000_000_000


@pytest.fixture(scope="module")
def reference() -> DriftReference:
    return DriftReference.from_samples(np.random.default_rng(0).random((20_000, FEATURES)), CLASSES)


def _window(
    reference: DriftReference, end_s: float, n: int, rng: np.random.Generator, device: str = "d1", shift: float = 0.0
) -> dict[str, Any]:
    """A stored telemetry row: `n` inputs (uniform like the reference's, plus `shift`), ending `end_s` seconds
    after ORIGIN_MS."""
    counts = WindowCounts.empty(reference)
    x = np.clip(rng.random((n, FEATURES)) + shift, 0, 0.999).astype(np.float32)
    counts.add(reference, x, np.full((n, CLASSES), 1 / CLASSES), np.ones(n))
    end_ms = ORIGIN_MS + int(end_s * 1000)
    window = ClosedWindow("digits@1.0.0", end_ms - 500, end_ms, counts)
    payload = window_to_proto(window, device, 1).SerializeToString()
    return {"device_id": device, "release_id": "digits@1.0.0", "end_ms": end_ms, "payload": payload}


def test_unchanged_inputs_in_small_buckets_read_as_no_drift(reference: DriftReference) -> None:
    """The bad-release plot's 0.85 on unchanged inputs: 2-s buckets of ~50 inputs, scored on their own (the old
    rule's minimum), put an empty bin in some feature of nearly every bucket; pooled until they hold enough
    inputs they read as what they are."""
    rng = np.random.default_rng(1)
    rows = [_window(reference, 0.5 + 0.5 * i, 13, rng) for i in range(200)]  # 26 inputs a second
    old_rule = [
        score_window(c, reference, min_samples=50)
        for c in (_pooled(rows[i : i + 4], reference) for i in range(0, 196, 4))
    ]
    assert max(s.max_psi for s in old_rule if s is not None) > 0.6  # what the plot showed: drift that is not there

    series = bucketed_drift(rows, lambda _: "site-0", lambda _: reference, ORIGIN_MS)

    points = series["site-0"]
    assert len(points) >= 3
    assert max(v for _, v in points) < 0.1  # far below the 0.25 gate
    assert all(t <= 100 for t, _ in points)


def _pooled(rows: list[dict[str, Any]], reference: DriftReference) -> WindowCounts:
    counts = WindowCounts.empty(reference)
    for r in rows:
        counts = counts.merge(counts_from_proto(pb.TelemetryWindow.FromString(r["payload"])))
    return counts


def test_drift_shows_up_and_the_partial_last_bucket_is_left_out(reference: DriftReference) -> None:
    rng = np.random.default_rng(2)
    rows = [_window(reference, 0.5 * i, 400, rng) for i in range(1, 20)]  # 0.5 … 9.5 s: 800 inputs a second
    rows += [_window(reference, 10 + 0.5 * i, 400, rng, shift=0.3) for i in range(1, 20)]  # drifted from 10 s
    rows.append(_window(reference, 20.1, MIN_BUCKET_SAMPLES, rng))  # the data ends inside the bucket from 20 s

    series = bucketed_drift(rows, lambda _: "fleet", lambda _: reference, ORIGIN_MS)

    times = [t for t, _ in series["fleet"]]
    values = dict(series["fleet"])
    assert times == [1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0, 17.0, 19.0]  # bucket middles on the run's clock
    assert max(values[t] for t in times[:5]) < 0.1 < 0.25 < min(values[t] for t in times[5:])


def test_windows_without_a_reference_or_group_are_skipped(reference: DriftReference) -> None:
    rng = np.random.default_rng(3)
    rows = [_window(reference, 0.5 * i, 600, rng, device=f"d{i % 2}") for i in range(1, 12)]
    references = references_of([("digits@1.0.0", {"drift_reference": reference.to_metadata()}), ("x@1", {})])
    assert set(references) == {"digits@1.0.0"}

    series = bucketed_drift(
        rows, lambda r: None if r["device_id"] == "d1" else "d0", lambda g: references.get("digits@1.0.0"), ORIGIN_MS
    )
    none = bucketed_drift(rows, lambda _: "fleet", lambda _: None, ORIGIN_MS)

    assert set(series) == {"d0"} and none == {}


def test_moments_share_the_run_clock() -> None:
    rollout = {
        "id": "rollout-2",
        "decisions": [
            {"wave": -1, "decision": "created", "at": ORIGIN_MS + 40_000},
            {"wave": 0, "decision": "start", "at": ORIGIN_MS + 41_000},
            {"wave": 0, "decision": "waiting", "at": ORIGIN_MS + 42_000},
            {"wave": 0, "decision": "advance", "at": ORIGIN_MS + 45_000},
            {"wave": 1, "decision": "completed", "at": ORIGIN_MS + 50_000},
        ],
    }
    alarm = {"opened_at": ORIGIN_MS + 20_000}
    job = {"created_at": ORIGIN_MS + 21_500}

    moments = loop_moments(ORIGIN_MS, 12.0, alarm, job, rollout)

    assert moments == [
        Moment(12.0, "fault", "sensor fault"),
        Moment(20.0, "alarm", "drift alarm"),
        Moment(21.5, "retrain", "retraining"),
        Moment(41.0, "rollout", "rollout-2 start"),
        Moment(45.0, "rollout", "rollout-2 advance"),
        Moment(50.0, "completed", "rollout-2 completed"),
    ]
    rolled_back = {"id": "rollout-1", "decisions": [{"decision": "rollback", "at_ms": ORIGIN_MS + 3_000}]}
    assert decision_moments([rolled_back], ORIGIN_MS) == [Moment(3.0, "rollback", "rollout-1 rollback")]
    assert loop_moments(ORIGIN_MS, None, None, None, None) == []
