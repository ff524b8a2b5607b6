"""A telemetry window's wire form, shared by the agent (which sends it) and the coordinator (which checks and pools
it): a closed window to its protobuf message, and a message back to counts, refusing inconsistent or absurd ones.

Differential privacy on the device (`noised`): the Laplace mechanism, pure ε, on everything a window publishes.
Neighbouring windows differ by one inference (or one failed inference). Its L1 sensitivity, in count units, is
`window_sensitivity`: per input feature one unit in that feature's bins or NaN count and one in its
out-of-range count (2 per feature), one score bin, one predicted class, one latency bin, one inputs_checked and
one of inputs_nonfinite / inputs_out_of_range (6), and entropy_sum counted as one unit of its own sensitivity,
n_classes / e (an inference's -sum p ln p, each p clipped to [1e-12, 1], is at most that, normalised or not).
A failed inference changes one count (errors), less than a served one. Laplace(b) on each unit with
b = sensitivity / ε (entropy_sum's scaled by n_classes / e) gives ε. inferences (the sum of the noised class
counts) and latency_max_ms (the top non-empty noised latency bin's upper edge) are read from noised counts.
The window's count fields hold the noised counts rounded, clamped to >= 0 and made consistent
(`WindowCounts.clamped`), so that it is a valid window to any coordinator; `dp_unclamped` holds them rounded but
signed, which a coordinator pools instead, so that pooled noise averages out rather than keep the clamping's
bias (about b/2 per window on every count near zero). Both are post-processing, which costs no ε.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edge_agent.contract import LIMITS
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.drift import LATENCY_EDGES_MS, WindowCounts, WindowNoise, max_entropy

__all__ = ["ClosedWindow", "counts_from_proto", "noised", "window_sensitivity", "window_to_proto"]

_MAX_COUNT = 2**53  # far beyond any real window; bigger is garbage


@dataclass(frozen=True)
class ClosedWindow:
    release_id: str
    start_ms: int
    end_ms: int
    counts: WindowCounts


def _count_fields(c: WindowCounts) -> dict[str, Any]:
    """The counts a TelemetryWindow and a NoisedCounts message both carry, under the same field names."""
    return {
        "errors": c.errors,
        "feature_bins": c.feature_counts.ravel().tolist(),
        "feature_nan": c.nan_counts.tolist(),
        "feature_out_of_range": c.out_of_range.tolist(),
        "score_counts": c.score_counts.tolist(),
        "class_counts": c.class_counts.tolist(),
        "latency_counts": c.latency_counts.tolist(),
        "entropy_sum": c.entropy_sum,
        "inputs_checked": c.inputs_checked,
        "inputs_nonfinite": c.inputs_nonfinite,
        "inputs_out_of_range": c.inputs_out_of_range,
    }


def window_to_proto(
    w: ClosedWindow, device_id: str, sequence: int, first_sequence: int | None = None
) -> pb.TelemetryWindow:
    c = w.counts.clamped()  # exact counts as they are; noised ones made a valid window (post-processing)
    msg = pb.TelemetryWindow(
        device_id=device_id,
        sequence=sequence,
        first_sequence=sequence if first_sequence is None else first_sequence,
        release_id=w.release_id,
        start_ms=w.start_ms,
        end_ms=w.end_ms,
        inferences=c.inferences,
        bins_per_feature=c.feature_counts.shape[1],
        latency_max_ms=c.latency_max_ms,
        **_count_fields(c),
    )
    if c.noise is not None:  # exact windows set none of these: byte for byte what they always were
        msg.dp_epsilon = c.noise.epsilon
        msg.dp_noise_scale = c.noise.scale
        msg.monitoring_spent_epsilon = c.noise.spent_epsilon
        msg.monitoring_budget_epsilon = c.noise.budget_epsilon
        msg.monitoring_budget_exhausted = c.noise.exhausted
        if c.noise.epsilon > 0:
            msg.dp_unclamped.CopyFrom(pb.NoisedCounts(**_count_fields(w.counts)))
    return msg


def _unclamped(m: pb.TelemetryWindow, clamped: WindowCounts) -> WindowCounts:
    """A noised window's signed counts (dp_unclamped), in the layout of its clamped ones; ValueError if they do not
    fit it or are absurd."""
    u = m.dp_unclamped
    arrays = [
        np.array(field, dtype=np.int64)
        for field in (u.feature_bins, u.feature_nan, u.feature_out_of_range, u.score_counts, u.class_counts)
    ]
    latency = np.array(u.latency_counts, dtype=np.int64)
    layout = (clamped.feature_counts, clamped.nan_counts, clamped.out_of_range, clamped.score_counts)
    shapes = tuple(a.size for a in (*layout, clamped.class_counts))
    if tuple(a.size for a in arrays) != shapes or latency.size != clamped.latency_counts.size:
        raise ValueError("unclamped noised counts do not have the window's layout")
    scalars = (u.errors, u.inputs_checked, u.inputs_nonfinite, u.inputs_out_of_range)
    signed = [*arrays, latency]
    if any(a.size and (a.max() > _MAX_COUNT or a.min() < -_MAX_COUNT) for a in signed) or any(
        abs(v) > _MAX_COUNT for v in scalars
    ):
        raise ValueError("unclamped noised counts are absurdly large")
    if not math.isfinite(u.entropy_sum):
        raise ValueError("unclamped entropy must be finite")
    feature_bins, nan, out_of_range, score, classes = arrays
    return replace(
        clamped,
        feature_counts=feature_bins.reshape(clamped.feature_counts.shape),
        nan_counts=nan,
        out_of_range=out_of_range,
        score_counts=score,
        class_counts=classes,
        latency_counts=latency,
        entropy_sum=u.entropy_sum,
        inferences=int(classes.sum()),
        errors=u.errors,
        inputs_checked=u.inputs_checked,
        inputs_nonfinite=u.inputs_nonfinite,
        inputs_out_of_range=u.inputs_out_of_range,
    )


def _noise_of(m: pb.TelemetryWindow) -> WindowNoise | None:
    """The window's noise and budget fields; None for an exact window (none set). ValueError if absurd."""
    values = (m.dp_epsilon, m.dp_noise_scale, m.monitoring_spent_epsilon, m.monitoring_budget_epsilon)
    if not any(values) and not m.monitoring_budget_exhausted:
        return None
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError("noise and budget figures must be finite and non-negative")
    if (m.dp_epsilon > 0) != (m.dp_noise_scale > 0):
        raise ValueError("a noised window states both its ε and its noise scale, a budget marker neither")
    if m.dp_epsilon == 0 and (m.inferences or m.errors or not m.monitoring_budget_exhausted):
        raise ValueError("a window without noise but with budget figures must be an empty budget-spent marker")
    return WindowNoise(
        epsilon=m.dp_epsilon,
        scale=m.dp_noise_scale,
        spent_epsilon=m.monitoring_spent_epsilon,
        budget_epsilon=m.monitoring_budget_epsilon,
        exhausted=m.monitoring_budget_exhausted,
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
    noise = _noise_of(m)
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
    counts = WindowCounts(
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
        noise=noise,
    )
    if m.HasField("dp_unclamped"):
        if noise is None or noise.epsilon == 0:
            raise ValueError("unclamped noised counts in a window that states no noise")
        return _unclamped(m, counts)
    return counts


def window_sensitivity(n_features: int) -> int:
    """The L1 sensitivity of everything a window publishes to one inference, in count units (module docstring)."""
    return 2 * n_features + 6


def noised(
    counts: WindowCounts,
    epsilon: float,
    rng: np.random.Generator,
    spent: float = 0.0,
    budget: float = 0.0,
    exhausted: bool = False,
) -> WindowCounts:
    """The window's counts with Laplace noise for ε (module docstring), rounded and left signed: pooled, their
    noise averages out (`WindowCounts.clamped` makes one window valid on its own). The device's monitoring budget
    after this window (`spent`, `budget`, `exhausted`) rides along. `rng` must be seeded from the OS's entropy:
    noise the coordinator could replay protects nothing."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError("ε per window must be a positive number")
    b = window_sensitivity(counts.feature_counts.shape[0]) / epsilon

    def noisy(a: np.ndarray) -> np.ndarray:
        return np.rint(a + rng.laplace(0.0, b, a.shape)).astype(np.int64)

    def one(value: int) -> int:
        return int(noisy(np.array([value]))[0])

    classes = noisy(counts.class_counts)
    signed = replace(
        counts,
        feature_counts=noisy(counts.feature_counts),
        nan_counts=noisy(counts.nan_counts),
        out_of_range=noisy(counts.out_of_range),
        score_counts=noisy(counts.score_counts),
        class_counts=classes,
        latency_counts=noisy(counts.latency_counts),
        entropy_sum=counts.entropy_sum + float(rng.laplace(0.0, b * max_entropy(counts.class_counts.size))),
        inferences=int(classes.sum()),
        errors=one(counts.errors),
        inputs_checked=one(counts.inputs_checked),
        inputs_nonfinite=one(counts.inputs_nonfinite),
        inputs_out_of_range=one(counts.inputs_out_of_range),
        latency_max_ms=0.0,  # not a count: read from the noised histogram below
        noise=WindowNoise(epsilon, b, spent, budget, exhausted),
    )
    return replace(signed, latency_max_ms=signed.clamped().latency_max_ms)
