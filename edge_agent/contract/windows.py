"""A telemetry window's wire form, shared by the agent (which sends it) and the coordinator (which checks and pools
it): a closed window to its protobuf message, and a message back to counts, refusing inconsistent or absurd ones."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_agent.contract import LIMITS
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.drift import LATENCY_EDGES_MS, WindowCounts

__all__ = ["ClosedWindow", "counts_from_proto", "window_to_proto"]

_MAX_COUNT = 2**53  # far beyond any real window; bigger is garbage


@dataclass(frozen=True)
class ClosedWindow:
    release_id: str
    start_ms: int
    end_ms: int
    counts: WindowCounts


def window_to_proto(
    w: ClosedWindow, device_id: str, sequence: int, first_sequence: int | None = None
) -> pb.TelemetryWindow:
    c = w.counts
    return pb.TelemetryWindow(
        device_id=device_id,
        sequence=sequence,
        first_sequence=sequence if first_sequence is None else first_sequence,
        release_id=w.release_id,
        start_ms=w.start_ms,
        end_ms=w.end_ms,
        inferences=c.inferences,
        errors=c.errors,
        bins_per_feature=c.feature_counts.shape[1],
        feature_bins=c.feature_counts.ravel().tolist(),
        feature_nan=c.nan_counts.tolist(),
        feature_out_of_range=c.out_of_range.tolist(),
        score_counts=c.score_counts.tolist(),
        class_counts=c.class_counts.tolist(),
        latency_counts=c.latency_counts.tolist(),
        entropy_sum=c.entropy_sum,
        latency_max_ms=c.latency_max_ms,
        inputs_checked=c.inputs_checked,
        inputs_nonfinite=c.inputs_nonfinite,
        inputs_out_of_range=c.inputs_out_of_range,
    )


def counts_from_proto(m: pb.TelemetryWindow) -> WindowCounts:
    """The counts of a window message; ValueError if they are inconsistent or absurd."""
    n, width = len(m.feature_nan), m.bins_per_feature
    if len(m.feature_bins) != n * width or len(m.feature_out_of_range) != n or (n and not width):
        raise ValueError("feature counts do not form n_features x bins_per_feature")
    if len(m.latency_counts) != len(LATENCY_EDGES_MS) + 1:
        raise ValueError(f"latency histogram has {len(m.latency_counts)} bins, expected {len(LATENCY_EDGES_MS) + 1}")
    arrays = [
        np.array(field, dtype=np.uint64)
        for field in (
            m.feature_bins,
            m.feature_nan,
            m.feature_out_of_range,
            m.score_counts,
            m.class_counts,
            m.latency_counts,
        )
    ]
    if any(a.size and a.max() > _MAX_COUNT for a in arrays) or m.inferences > _MAX_COUNT or m.errors > _MAX_COUNT:
        raise ValueError("counts are absurdly large")
    # An older agent sends no data-quality counts (all 0: nothing checked), which stays consistent.
    if m.inputs_checked > m.inferences or m.inputs_nonfinite + m.inputs_out_of_range > m.inputs_checked:
        raise ValueError("inputs checked against the schema exceed the inferences, or those breaking it the checked")
    feature_bins, nan, out_of_range, score, classes, latency = (a.astype(np.int64) for a in arrays)
    if not (
        np.isfinite(m.entropy_sum) and m.entropy_sum >= 0 and np.isfinite(m.latency_max_ms) and m.latency_max_ms >= 0
    ):
        raise ValueError("entropy and latency must be finite and non-negative")
    if int(classes.sum()) != m.inferences or int(latency.sum()) > m.inferences:
        raise ValueError("class counts do not add up to the number of inferences")
    if m.first_sequence == 0 or m.first_sequence > m.sequence or m.start_ms > m.end_ms:
        raise ValueError("sequence range or time range is inverted")
    if m.sequence - m.first_sequence >= LIMITS.telemetry_summary_span:
        raise ValueError(f"a window summarizes at most {LIMITS.telemetry_summary_span} windows")
    return WindowCounts(
        feature_counts=feature_bins.reshape(n, width),
        nan_counts=nan,
        out_of_range=out_of_range,
        score_counts=score,
        class_counts=classes,
        latency_counts=latency,
        entropy_sum=m.entropy_sum,
        latency_max_ms=m.latency_max_ms,
        inferences=m.inferences,
        errors=m.errors,
        inputs_checked=m.inputs_checked,
        inputs_nonfinite=m.inputs_nonfinite,
        inputs_out_of_range=m.inputs_out_of_range,
    )
