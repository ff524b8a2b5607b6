"""One metric registry: every metric a rollout gate or the drift alarm can judge, defined once — its name, what it
means, what kind of evidence it needs, whether it is a fraction, and how it is computed from pooled telemetry.
Rollout gates (server.rollout), the drift watch (server.loop), the dashboard, /metrics and the simulation
reports all read it from here.

    devices         judged from device outcomes (install events, silence, stale data); needs no samples
    wave            from the wave's pooled telemetry against the release's reference; needs min_samples
    versus-control  the wave's pooled telemetry against the control cohort's; both need min_samples

Samples are effective samples (edge_agent.contract.drift.effective_samples): the inferences, or fewer when devices
noise their windows (differential privacy on the device), what the noised counts are worth.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from edge_agent.contract.drift import (
    LATENCY_EDGES_MS,
    WindowCounts,
    WindowScore,
    histogram_quantile,
)

__all__ = [
    "LATENCY_FLOOR_MS",
    "METRICS",
    "SCORE_METRICS",
    "Metric",
    "MetricKind",
    "invalid_input_rate",
    "stale_data_fraction",
    "telemetry_values",
]


class MetricKind(StrEnum):
    DEVICES = "devices"
    WAVE = "wave"
    VERSUS_CONTROL = "versus-control"


@dataclass(frozen=True)
class Metric:
    name: str
    kind: MetricKind
    meaning: str
    fraction: bool = False  # a value in [0, 1]: a threshold outside it could never fail (or never pass)
    of_score: Callable[[WindowScore], float | None] | None = None  # from the wave's score against its reference
    of_counts: Callable[[WindowCounts], float | None] | None = None  # from the wave's counts alone
    versus: Callable[[WindowCounts, WindowCounts], float | None] | None = None  # the wave's counts vs the control's


def _class_mix_shift(wave: WindowCounts, control: WindowCounts) -> float | None:
    if (
        wave.class_counts.shape != control.class_counts.shape
        or not wave.class_counts.sum()
        or not control.class_counts.sum()
    ):
        return None
    p = wave.class_counts / wave.class_counts.sum()
    q = control.class_counts / control.class_counts.sum()
    return float(0.5 * np.abs(p - q).sum())


# Latencies below this count as this much when comparing p95s: on a busy device a sub-millisecond inference
# doubles with scheduling noise alone, and no user notices it; a regression past a millisecond still shows.
LATENCY_FLOOR_MS = 1.0


def _latency_ratio(wave: WindowCounts, control: WindowCounts) -> float | None:
    if not wave.latency_counts.sum() or not control.latency_counts.sum():
        return None
    ours = histogram_quantile(wave.latency_counts, LATENCY_EDGES_MS, 0.95)
    theirs = histogram_quantile(control.latency_counts, LATENCY_EDGES_MS, 0.95)
    return max(ours, LATENCY_FLOOR_MS) / max(theirs, LATENCY_FLOOR_MS)


def _above_noise(counts: WindowCounts, denominator: int) -> bool:
    """Whether a rate's denominator stands out of the noise on noised counts (three standard deviations of one
    count's noise); always, for exact counts. Below it the denominator may be noise itself (inputs_checked of a
    release without an input schema is 0 plus noise), and the rate is not computed rather than made up."""
    return counts.noise is None or counts.noise.variance <= 0 or denominator > 3 * math.sqrt(counts.noise.variance)


def invalid_input_rate(checked: int, nonfinite: int, out_of_range: int) -> float | None:
    """Inputs that broke the release's input schema (non-finite, or out of its valid range) over the inputs
    checked against it; None when none were checked (no schema, or agents that do not check)."""
    return (nonfinite + out_of_range) / checked if checked else None


def stale_data_fraction(devices: int, stale: int) -> float | None:
    """Devices whose inference count stayed at zero for the freshness bound (stale data) over the devices judged
    (those given the bound's time to report); None when none were."""
    return stale / devices if devices else None


_ALL = (
    Metric(
        "input_max_psi",
        MetricKind.WAVE,
        "largest per-feature PSI of the wave's inputs vs the release reference",
        of_score=lambda s: s.max_psi if s.feature_psi.size else None,
    ),
    Metric(
        "input_mean_psi",
        MetricKind.WAVE,
        "mean per-feature PSI of the wave's inputs vs the release reference",
        of_score=lambda s: s.mean_psi if s.feature_psi.size else None,
    ),
    Metric(
        "input_max_kl",
        MetricKind.WAVE,
        "largest per-feature KL(wave || reference) of the inputs",
        of_score=lambda s: float(s.feature_kl.max()) if s.feature_kl.size else None,
    ),
    Metric(
        "score_psi",
        MetricKind.WAVE,
        "PSI of the wave's top-class score vs the release reference",
        of_score=lambda s: s.score_psi,
    ),
    Metric(
        "class_mix_shift",
        MetricKind.VERSUS_CONTROL,
        "total variation distance between the wave's and the control's predicted classes",
        fraction=True,
        versus=_class_mix_shift,
    ),
    Metric(
        "latency_p95_ratio",
        MetricKind.VERSUS_CONTROL,
        f"the wave's p95 inference latency over the control's (each at least {LATENCY_FLOOR_MS:g} ms)",
        versus=_latency_ratio,
    ),
    Metric(
        "error_rate",
        MetricKind.WAVE,
        "failed inferences over all inferences in the wave",
        fraction=True,
        of_counts=lambda c: c.errors / max(1, c.errors + c.inferences) if _above_noise(c, c.inferences) else None,
    ),
    Metric(
        "invalid_input_rate",
        MetricKind.WAVE,
        "the wave's inputs that broke the release's input schema (NaN or infinite, or out of its valid range) "
        "over the inputs checked",
        fraction=True,
        of_counts=lambda c: (
            invalid_input_rate(c.inputs_checked, c.inputs_nonfinite, c.inputs_out_of_range)
            if _above_noise(c, c.inputs_checked)
            else None
        ),
    ),
    Metric(
        "failure_rate",
        MetricKind.DEVICES,
        "wave devices whose install failed, was refused or failed its probe, over wave devices",
        fraction=True,
    ),
    Metric(
        "silent_fraction",
        MetricKind.DEVICES,
        "wave devices with no outcome silent_after_seconds after their assignment, over wave devices",
        fraction=True,
    ),
    Metric(
        "stale_data_fraction",
        MetricKind.DEVICES,
        "wave devices running the release whose inference count stayed at zero for the policy's "
        "data_quality.stale_after_seconds (stale data), over those running it that long",
        fraction=True,
    ),
)
METRICS: dict[str, Metric] = {m.name: m for m in _ALL}
# The metrics a pooled window's score against its reference gives (the drift alarm may judge these).
SCORE_METRICS: tuple[str, ...] = tuple(m.name for m in _ALL if m.of_score is not None)


def telemetry_values(wave: WindowCounts, score: WindowScore | None, control: WindowCounts) -> dict[str, float | None]:
    """Every metric that pooled telemetry gives: the wave's, and the wave's against the control's."""
    values: dict[str, float | None] = {}
    for m in _ALL:
        if m.of_score is not None:
            values[m.name] = None if score is None else m.of_score(score)
        elif m.of_counts is not None:
            values[m.name] = m.of_counts(wave)
        elif m.versus is not None:
            values[m.name] = m.versus(wave, control)
    return values
