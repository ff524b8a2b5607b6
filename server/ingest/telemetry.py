"""Telemetry on the coordinator: check, store exactly once, confirm with a watermark, pool for statistics.

A window is stored under (device, sequence). A resend of a stored window (same range) changes nothing and is
confirmed again; a window overlapping stored ones differently is refused. The watermark is the highest
sequence up to which every sequence is stored, so a device never deletes a window that was not stored.

A noised window (differential privacy on the device) is stored like any other, and its ε goes into the
monitoring ledger (server/store/monitoring.py) in the same transaction, once: a resend charges nothing again.
Pooled noised counts are worth fewer samples than they count (`effective_samples`, which the gates' minimum
samples and the drift watch's evidence compare).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from edge_agent.contract import LIMITS, device_id_is_valid
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.drift import (
    DriftReference,
    WindowCounts,
    WindowNoise,
    WindowScore,
    effective_samples,
    score_window,
)
from edge_agent.contract.windows import counts_from_proto
from server.errors import NotFoundError
from server.ingest.events import EventRejected
from server.rollout.metrics import METRICS, invalid_input_rate
from server.store import Store, now_ms
from server.store.monitoring import MonitoringLedger
from server.store.telemetry import TelemetryRecords

__all__ = [
    "REJECTED",
    "IngestResult",
    "Pooled",
    "ingest_window",
    "ingest_windows",
    "parse_window",
    "pool",
    "release_reference",
    "stale_data",
    "watermark",
]

# The furthest a window's sequence can be past the device's watermark: a full outbox of the widest summaries.
_SEQUENCES_AHEAD = LIMITS.outbox_cap * LIMITS.telemetry_summary_span

# Telemetry windows refused in this process, by transport (mqtt, grpc): exported on /metrics.
REJECTED: Counter[str] = Counter()


@dataclass(frozen=True)
class IngestResult:
    stored: bool  # False: an exact resend of a stored window
    watermark: int


def parse_window(payload: bytes) -> pb.TelemetryWindow:
    if len(payload) > LIMITS.mqtt_telemetry_payload:
        REJECTED["mqtt"] += 1
        raise EventRejected(f"telemetry window of {len(payload)} bytes exceeds {LIMITS.mqtt_telemetry_payload}")
    try:
        return pb.TelemetryWindow.FromString(payload)
    except DecodeError as e:
        REJECTED["mqtt"] += 1
        raise EventRejected("not a valid TelemetryWindow message") from e


_REFERENCES: dict[tuple[str, str], DriftReference | None] = {}


def release_reference(store: Store, release_id: str) -> DriftReference | None:
    """The release's drift reference. Releases never change, so each is decoded once per store file."""
    key = (str(store.path), release_id)
    if key not in _REFERENCES:
        try:
            doc = store.release(release_id).custom.get("drift_reference")
        except NotFoundError as e:
            raise EventRejected(f"window names unknown release {release_id[:80]!r}") from e
        _REFERENCES[key] = DriftReference.from_metadata(doc) if doc else None
    return _REFERENCES[key]


def _check(store: Store, m: pb.TelemetryWindow, topic_device: str | None) -> WindowCounts:
    if not device_id_is_valid(m.device_id):
        raise EventRejected(f"device_id {m.device_id[:40]!r} is not a valid id")
    if topic_device is not None and m.device_id != topic_device:
        raise EventRejected(f"window names device {m.device_id!r} but was sent on {topic_device!r}'s topic")
    if not store.is_device(m.device_id):
        raise EventRejected(f"device {m.device_id!r} has not registered")
    try:
        counts = counts_from_proto(m)
    except ValueError as e:
        raise EventRejected(f"window counts rejected: {e}") from e
    reference = release_reference(store, m.release_id)
    if reference is not None and counts.feature_counts.shape != (reference.n_features, reference.n_bins):
        raise EventRejected(
            f"window has {counts.feature_counts.shape} feature bins, release {m.release_id} has "
            f"{(reference.n_features, reference.n_bins)}"
        )
    return counts


def watermark(store: Store, device_id: str) -> int:
    return TelemetryRecords(store).watermark(device_id)


def ingest_window(store: Store, m: pb.TelemetryWindow, topic_device: str | None, via: str) -> IngestResult:
    """Check and store one window; EventRejected (with the reason) stores nothing."""
    result = ingest_windows(store, [(m, topic_device)], via)[0]
    if isinstance(result, EventRejected):
        raise result
    return result


def ingest_windows(
    store: Store, batch: list[tuple[pb.TelemetryWindow, str | None]], via: str
) -> list[IngestResult | EventRejected]:
    """Check and store many windows in one transaction; one result (or refusal) per window, in order.

    A refused window stores nothing and does not affect the others.
    """
    results: list[IngestResult | EventRejected | None] = []
    checked: list[int] = []
    noise: dict[int, WindowNoise] = {}
    for i, (m, topic_device) in enumerate(batch):
        try:
            counts = _check(store, m, topic_device)
        except EventRejected as e:
            results.append(e)
            continue
        if counts.noise is not None:
            noise[i] = counts.noise
        results.append(None)
        checked.append(i)
    if not checked:
        return [r for r in results if r is not None]
    marks: dict[str, int] = {}
    stored: list[tuple[int, bool]] = []
    received = now_ms()
    records = TelemetryRecords(store)
    ledger = MonitoringLedger(store)
    with store.transaction():
        for i in checked:
            m = batch[i][0]
            if m.device_id not in marks:
                marks[m.device_id] = records.watermark(m.device_id)
            overlapping = records.overlapping(m.device_id, m.first_sequence, m.sequence)
            if overlapping == [(m.first_sequence, m.sequence)]:
                stored.append((i, False))
                continue
            if overlapping or m.sequence <= marks[m.device_id]:
                results[i] = EventRejected(f"window {m.first_sequence}..{m.sequence} overlaps windows already stored")
                continue
            if m.sequence > marks[m.device_id] + _SEQUENCES_AHEAD:
                # No outbox holds that much unconfirmed; storing it would only make later real windows overlap.
                results[i] = EventRejected(
                    f"window {m.sequence} is beyond what the device's outbox can hold past its confirmed "
                    f"{marks[m.device_id]} ({_SEQUENCES_AHEAD} sequence numbers)"
                )
                continue
            records.insert(m, received, via)
            if i in noise:
                ledger.record(m.device_id, m.first_sequence, m.sequence, m.release_id, noise[i], received)
            stored.append((i, True))
        for device, current in marks.items():
            mark = current
            for first, last in records.ranges_after(device, current):
                if first != mark + 1:
                    break
                mark = last
            if mark != current:
                records.set_watermark(device, mark)
            marks[device] = mark
    for i, new in stored:
        results[i] = IngestResult(new, marks[batch[i][0].device_id])
    done = [r for r in results if r is not None]
    REJECTED[via] += sum(1 for r in done if isinstance(r, EventRejected))
    return done


@dataclass(frozen=True)
class Pooled:
    release_id: str
    windows: int
    devices: int
    counts: WindowCounts
    score: WindowScore | None  # None: too few samples, or the release has no drift reference

    def metric(self, name: str) -> float | None:
        """One of server.rollout.metrics.SCORE_METRICS, or None when the pool has no score (too few samples, no
        reference)."""
        of_score = METRICS[name].of_score
        assert of_score is not None, f"{name} is not read from a score"
        return None if self.score is None else of_score(self.score)

    def to_json(self) -> dict[str, Any]:
        s = self.score
        return {
            "release": self.release_id,
            "windows": self.windows,
            "devices": self.devices,
            "inferences": self.counts.inferences,
            "effective_samples": effective_samples(self.counts),  # the inferences unless windows were noised
            "noised": self.counts.noise is not None,
            "errors": self.counts.errors,
            "scored": s is not None,
            "max_psi": self.metric("input_max_psi"),
            "mean_psi": self.metric("input_mean_psi"),
            "max_kl": self.metric("input_max_kl"),
            "score_psi": self.metric("score_psi"),
            "latency_p50_ms": s.latency_p50_ms if s else None,
            "latency_p95_ms": s.latency_p95_ms if s else None,
            "latency_max_ms": self.counts.latency_max_ms,
            "class_mix": (self.counts.class_counts / max(1, self.counts.inferences)).round(4).tolist(),
            "nan": int(self.counts.nan_counts.sum()),
            "out_of_range": int(self.counts.out_of_range.sum()),
            "inputs_checked": self.counts.inputs_checked,
            "inputs_nonfinite": self.counts.inputs_nonfinite,
            "inputs_out_of_range": self.counts.inputs_out_of_range,
            "invalid_input_rate": invalid_input_rate(
                self.counts.inputs_checked, self.counts.inputs_nonfinite, self.counts.inputs_out_of_range
            ),
        }


def pool(
    store: Store,
    release_id: str,
    devices: list[str] | None = None,
    since_ms: int = 0,
    until_ms: int | None = None,
    min_samples: int | None = None,
) -> Pooled:
    """Add up the windows of one release (optionally a cohort of devices and a time range) and score them
    (`min_samples`: fewer inferences give no score; default ten per bin)."""
    total: WindowCounts | None = None
    seen: set[str] = set()
    windows = 0
    for device_id, payload in TelemetryRecords(store).payloads(release_id, devices, since_ms, until_ms):
        counts = counts_from_proto(pb.TelemetryWindow.FromString(payload))
        total = counts if total is None else total.merge(counts)
        seen.add(device_id)
        windows += 1
    reference = release_reference(store, release_id)
    if total is not None:
        total = total.clamped()  # noised windows pool signed, so their noise averages out; then made valid
    if total is None:
        n_classes = reference.n_classes if reference else 2
        total = WindowCounts.empty(reference or DriftReference.empty(n_classes))
    score = score_window(total, reference, min_samples) if reference is not None and windows else None
    return Pooled(release_id, windows, len(seen), total, score)


def stale_data(
    store: Store, release_id: str | None, assigned_at: dict[str, int], now: int, bound_seconds: float
) -> tuple[int, int]:
    """(judged, stale) devices for the `stale_data_fraction` metric: of the devices given (each with the time from
    which it was to report: its assignment, or its registration), those that have had the bound's time count as
    judged, and stale when their newest window with an inference (of the release, if given) ended before
    `now - bound` — their inference count stayed at zero for the freshness bound."""
    cutoff = now - int(bound_seconds * 1000)
    judged = [device for device, since in assigned_at.items() if since <= cutoff]
    last = TelemetryRecords(store).last_inference_ms(judged, release_id)
    return len(judged), sum(1 for device in judged if last.get(device, 0) < cutoff)
