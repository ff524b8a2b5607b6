"""Drift statistics: the PSI/KL convention's test vectors, pooling, the minimum-sample rule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.contract.arrays import decode_array, encode_array
from edge_agent.contract.drift import (
    LATENCY_EDGES_MS,
    DriftReference,
    WindowCounts,
    bin_counts,
    histogram_quantile,
    kl,
    proportions,
    psi,
    score_window,
)


def test_psi_and_kl_test_vectors() -> None:
    rng = np.random.default_rng(42)
    ref = rng.normal(0, 1, 10_000)
    cur = rng.normal(0.5, 1, 10_000)
    inner = np.quantile(ref, np.linspace(0, 1, 11))[1:-1]
    r, c = proportions(bin_counts(ref, inner)), proportions(bin_counts(cur, inner))
    assert psi(r, c) == pytest.approx(0.267708, abs=1e-6)
    assert kl(c, r) == pytest.approx(0.132177, abs=1e-6)
    assert kl(r, c) == pytest.approx(0.135531, abs=1e-6)


def test_bins_are_open_ended_and_nan_is_apart() -> None:
    counts = bin_counts(np.array([-1e9, -1.0, 0.0, 0.5, 1.0, 1e9, np.nan]), np.array([0.0, 1.0]))
    assert counts.tolist() == [2, 2, 2]  # (-inf, 0), [0, 1), [1, inf); the NaN is in none


def test_floor_without_renormalising() -> None:
    p = proportions(np.array([0, 5, 5]))
    assert p.tolist() == [1e-4, 0.5, 0.5] and p.sum() > 1.0
    with pytest.raises(ValueError):
        proportions(np.array([0, 0]))


def reference(n_features: int = 3, n_classes: int = 4) -> DriftReference:
    return DriftReference.from_samples(np.random.default_rng(0).normal(0, 1, (5000, n_features)), n_classes)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def _window(ref: DriftReference, x: np.ndarray, logits: np.ndarray, lat: np.ndarray) -> WindowCounts:
    w = WindowCounts.empty(ref)
    w.add(ref, x, _softmax(logits), lat)
    return w


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(0, 2**31 - 1), st.floats(-2, 2))
def test_pooling_two_windows_equals_one_window_over_both(n1: int, n2: int, seed: int, shift: float) -> None:
    ref = reference()
    rng = np.random.default_rng(seed)
    x = rng.normal(shift, 1, (n1 + n2, 3))
    x[rng.random(x.shape) < 0.02] = np.nan
    logits = rng.normal(0, 2, (n1 + n2, 4))
    lat = rng.exponential(3.0, n1 + n2)
    pooled = _window(ref, x[:n1], logits[:n1], lat[:n1]).merge(_window(ref, x[n1:], logits[n1:], lat[n1:]))
    whole = _window(ref, x, logits, lat)
    for name in ("feature_counts", "nan_counts", "out_of_range", "score_counts", "class_counts", "latency_counts"):
        assert np.array_equal(getattr(pooled, name), getattr(whole, name)), name
    assert pooled.inferences == whole.inferences and pooled.latency_max_ms == whole.latency_max_ms
    assert pooled.entropy_sum == pytest.approx(whole.entropy_sum, rel=1e-9)
    a, b = score_window(pooled, ref, min_samples=1), score_window(whole, ref, min_samples=1)
    if a is None or b is None:
        assert a is None and b is None  # e.g. a feature whose every value was NaN
        return
    assert np.allclose(a.feature_psi, b.feature_psi) and a.score_psi == pytest.approx(b.score_psi)
    assert a.latency_p95_ms == pytest.approx(b.latency_p95_ms) and a.mean_entropy == pytest.approx(b.mean_entropy)


def test_small_windows_are_not_scored_and_drift_is_seen() -> None:
    ref = reference()
    rng = np.random.default_rng(1)
    assert ref.n_bins == 10  # so 10 x 10 = 100 samples are needed by default
    small = _window(ref, rng.normal(0, 1, (99, 3)), rng.normal(0, 1, (99, 4)), np.ones(99))
    assert score_window(small, ref) is None
    small.add(ref, rng.normal(0, 1, (1, 3)), _softmax(rng.normal(0, 1, (1, 4))), [1.0])
    assert score_window(small, ref) is not None
    same = _window(ref, rng.normal(0, 1, (2000, 3)), rng.normal(0, 1, (2000, 4)), np.ones(2000))
    drifted = _window(ref, rng.normal(1.5, 1, (2000, 3)), rng.normal(0, 1, (2000, 4)), np.ones(2000))
    s_same, s_drift = score_window(same, ref), score_window(drifted, ref)
    assert s_same is not None and s_drift is not None
    assert s_same.max_psi < 0.05 < 0.5 < s_drift.max_psi
    assert drifted.out_of_range.sum() > same.out_of_range.sum()


def test_latency_quantiles_from_the_histogram() -> None:
    counts = bin_counts(np.full(100, 3.0), LATENCY_EDGES_MS)
    assert 2.0 <= histogram_quantile(counts, LATENCY_EDGES_MS, 0.5) <= 5.0


def test_reference_round_trips_through_signed_metadata_and_refuses_garbage() -> None:
    ref = reference()
    back = DriftReference.from_metadata(ref.to_metadata())
    assert np.array_equal(back.feature_edges, ref.feature_edges) and back.n_classes == ref.n_classes
    bad = ref.to_metadata()
    bad["feature_proportions"] = bad["score_proportions"]
    with pytest.raises(ValueError):
        DriftReference.from_metadata(bad)
    with pytest.raises(ValueError):
        DriftReference.from_metadata({"n_classes": 3})


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 200))
def test_float32_inputs_are_counted_exactly_as_their_float64_values(seed: int, n: int) -> None:
    """A TFLite model's float32 inputs are compared in float32 against edges rounded the right way; the counts
    must be those of the same values in float64, also for values on, or one float32 step beside, an edge."""
    ref = reference()
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1.5, (n, 3)).astype(np.float32)
    which = rng.integers(0, ref.feature_edges.shape[1], (n, 3))
    on_edges = ref.feature_edges.astype(np.float32)[np.arange(3)[None, :], which]
    pick = rng.random((n, 3))
    x = np.where(pick < 0.2, on_edges, x)
    x = np.where((pick >= 0.2) & (pick < 0.3), np.nextafter(on_edges, np.float32(-np.inf)), x)
    x = np.where((pick >= 0.3) & (pick < 0.35), np.float32(np.nan), x)
    x[rng.random(n) < 0.05] = ref.feature_ranges[:, 1].astype(np.float32)  # the range's end, rounded either way
    p = _softmax(rng.normal(0, 1, (n, 4)))
    lat = np.ones(n)
    single, double = _window(ref, x, np.log(p), lat), _window(ref, x.astype(np.float64), np.log(p), lat)
    for name in ("feature_counts", "nan_counts", "out_of_range"):
        assert np.array_equal(getattr(single, name), getattr(double, name)), name


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 700), st.sampled_from([np.float32, np.float64]))
def test_window_counts_match_a_plain_count_per_feature(seed: int, n: int, dtype: type) -> None:
    """The counts come from one comparison of whole batches against all bounds at once; they must equal a plain
    per-feature count (np.searchsorted, then the range by hand), also across batch chunks, for repeated edges,
    infinite edges and values, values on edges and on the range's ends, and NaN."""
    rng = np.random.default_rng(seed)
    edges = np.sort(rng.normal(0, 1, (4, 5)), axis=1)
    edges[0, 1:3] = edges[0, 1]  # repeated edges: an empty bin between them
    edges[1, -1] = np.inf  # nothing but +inf reaches the last edge
    ranges = np.stack([edges[:, 0] - 0.5, edges[:, -2] + 0.5], axis=1)
    ranges[2] = [-np.inf, np.inf]  # a feature nothing is out of range for
    props = np.full((4, 6), 1 / 6)
    ref = DriftReference(edges, props, ranges, np.linspace(0, 1, 11)[1:-1], np.full(10, 0.1), 3)
    x = rng.normal(0, 1.5, (n, 4))
    pick = rng.random((n, 4))
    specials = np.array([np.nan, np.inf, -np.inf])
    x = np.where(pick < 0.1, edges[np.arange(4), rng.integers(0, 5, (n, 4))], x)
    x = np.where((pick >= 0.1) & (pick < 0.15), ranges[np.arange(4), rng.integers(0, 2, (n, 4))], x)
    x = np.where((pick >= 0.15) & (pick < 0.2), specials[rng.integers(0, 3, (n, 4))], x)
    x = x.astype(dtype)
    counts = _window(ref, x, rng.normal(0, 1, (n, 3)), np.ones(n))
    values = x.astype(np.float64)
    for j in range(4):
        assert counts.feature_counts[j].tolist() == bin_counts(values[:, j], edges[j]).tolist(), j
        with np.errstate(invalid="ignore"):
            outside = (values[:, j] < ranges[j, 0]) | (values[:, j] > ranges[j, 1])
        assert counts.out_of_range[j] == outside.sum() and counts.nan_counts[j] == np.isnan(values[:, j]).sum()


def test_a_reference_with_nan_edges_or_ranges_is_refused() -> None:
    good = reference().to_metadata()
    for name in ("feature_edges", "feature_ranges", "score_edges"):
        array = decode_array(good[name])
        array.flat[0] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            DriftReference.from_metadata({**good, name: encode_array(array)})


def test_reference_edges_from_pooled_fine_histograms_match_the_samples_quantiles() -> None:
    """What federated training does: clients send fine histograms, never samples; the edges and ranges built from
    the pooled counts are the samples' own quantiles and extremes, to the fine grid's resolution."""
    from edge_agent.contract.drift import bin_counts, edges_from_fine_histograms

    rng = np.random.default_rng(3)
    samples = np.clip(rng.beta(2, 5, size=(20_000, 4)), 0, 1)
    samples[:, 3] = np.clip(samples[:, 3] * 0.5 + 0.25, 0, 1)  # a feature that never reaches 0 or 1
    m = 200
    grid = np.linspace(0, 1, m + 1)[1:-1]
    # m fine bins plus one below 0 and one above 1 (empty here): as a client counts them
    fine = np.stack([np.concatenate([[0], bin_counts(samples[:, j], grid), [0]]) for j in range(4)])
    edges, ranges = edges_from_fine_histograms(fine, 0.0, 1.0, 10)
    assert edges.shape == (4, 9) and ranges.shape == (4, 2)
    expected = np.quantile(samples, np.linspace(0, 1, 11)[1:-1], axis=0).T
    assert np.abs(edges - expected).max() <= 1 / m + 1e-9
    assert np.all(np.diff(edges, axis=1) >= 0)
    assert np.all(ranges[:, 0] <= samples.min(axis=0)) and np.all(ranges[:, 1] >= samples.max(axis=0))
    assert np.all(samples.min(axis=0) - ranges[:, 0] <= 1 / m) and np.all(ranges[:, 1] - samples.max(axis=0) <= 1 / m)
