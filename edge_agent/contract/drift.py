"""Drift and health statistics over windows of inferences. Pure values and functions, no I/O.

Conventions (shared with the coordinator, which pools windows across devices):
- A feature's bins come from inner edges e_0 < ... < e_{k-1}; the outer bins are open-ended, so there are
  k + 1 bins: (-inf, e_0), [e_0, e_1), ..., [e_{k-1}, +inf). NaN values are counted apart, in no bin.
- Proportions are counts / total, each floored at 1e-4, and not renormalised afterwards. Logs are natural.
- PSI(ref, cur) = sum (cur - ref) * ln(cur / ref); KL(p || q) = sum p * ln(p / q).
- A window holds raw counts, never raw samples, so windows pool by adding counts: statistics of pooled
  windows equal the statistics of one window over all their samples.
- A window with fewer samples than `min_samples` (default 10 x the number of bins) is not scored. A noised window
  (differential privacy on the device, `WindowNoise`) is worth fewer samples than it counts: `effective_samples`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edge_agent.contract.arrays import decode_array, encode_array

__all__ = [
    "LATENCY_EDGES_MS",
    "MIN_PROPORTION",
    "DriftReference",
    "WindowCounts",
    "WindowNoise",
    "WindowScore",
    "bin_counts",
    "edges_from_fine_histograms",
    "effective_samples",
    "histogram_quantile",
    "kl",
    "max_entropy",
    "proportions",
    "psi",
    "score_window",
]

MIN_PROPORTION = 1e-4
# Inner edges of the latency histogram, in milliseconds (roughly 1-2-5 steps).
LATENCY_EDGES_MS = np.array([0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000], dtype=np.float64)


def bin_counts(values: np.ndarray, inner_edges: np.ndarray) -> np.ndarray:
    """Counts per bin (len(inner_edges) + 1 bins, outer bins open-ended); NaNs are not counted."""
    v = np.asarray(values, dtype=np.float64).ravel()
    nan = np.isnan(v)
    if nan.any():
        v = v[~nan]
    return np.bincount(np.searchsorted(inner_edges, v, side="right"), minlength=len(inner_edges) + 1).astype(np.int64)


def proportions(counts: np.ndarray) -> np.ndarray:
    """counts / total, floored at MIN_PROPORTION, not renormalised. A total of zero is an error."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum(axis=-1, keepdims=True)
    if np.any(total <= 0):
        raise ValueError("proportions of an empty histogram")
    floored: np.ndarray = np.maximum(c / total, MIN_PROPORTION)
    return floored


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index between two proportion vectors (already floored)."""
    return float(np.sum((current - reference) * np.log(current / reference)))


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """Kullback-Leibler divergence KL(p || q) of two proportion vectors (already floored)."""
    return float(np.sum(p * np.log(p / q)))


def histogram_quantile(counts: np.ndarray, inner_edges: np.ndarray, q: float) -> float:
    """The q-quantile read from a histogram, linear within the bin; outer bins report their inner edge."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if total <= 0:
        return float("nan")
    target = q * total
    cum = np.cumsum(c)
    i = int(np.searchsorted(cum, target, side="left"))
    if i == 0:
        return float(inner_edges[0])
    if i >= len(inner_edges):
        return float(inner_edges[-1])
    lo, hi = inner_edges[i - 1], inner_edges[i]
    before = cum[i - 1]
    frac = (target - before) / c[i] if c[i] > 0 else 0.0
    return float(lo + frac * (hi - lo))


# Rows of inputs compared at once against a reference's bounds. The bounds are kept tiled to this many rows
# (11 bounds x 256 rows x 64 features: 720 KB in float32) so that one comparison covers a whole chunk.
_CHUNK = 256
_ONES = np.ones(_CHUNK, np.float32)


def _tile(bounds: np.ndarray) -> np.ndarray:
    """(n_bounds, n_features) -> (n_bounds, _CHUNK, n_features), each bound row repeated for every input row.
    Shared, read-only, by every reference with the same bounds (a fleet simulated in one process holds one
    reference per device, all of the same release)."""
    return _shared_tile(bounds.tobytes(), bounds.dtype.str, *bounds.shape)


@functools.lru_cache(maxsize=16)
def _shared_tile(data: bytes, dtype: str, n_bounds: int, n_features: int) -> np.ndarray:
    bounds = np.frombuffer(data, dtype).reshape(n_bounds, n_features)
    tile = np.ascontiguousarray(np.broadcast_to(bounds[:, None, :], (n_bounds, _CHUNK, n_features)))
    tile.setflags(write=False)
    return tile


def _float32_toward(values: np.ndarray, direction: float) -> np.ndarray:
    """Each value as the nearest float32 on the side of `direction` (itself when it is a float32)."""
    v = np.asarray(values, np.float64)
    with np.errstate(over="ignore"):  # beyond float32's range: ±inf, still on the right side
        f = v.astype(np.float32)
    off = f.astype(np.float64) < v if direction > 0 else f.astype(np.float64) > v
    return np.where(off, np.nextafter(f, np.float32(direction)), f)


def edges_from_fine_histograms(fine: np.ndarray, lo: float, hi: float, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """A reference's bin edges and ranges from pooled fine histograms, so a federation never pools samples.

    `fine` is (n_features, m + 2): m equal bins over [lo, hi], with the first and last column counting values
    below lo and above hi. Returns the inner edges of `bins` quantile bins per feature, (n_features, bins - 1),
    never decreasing, and each feature's observed range, (n_features, 2), to the fine grid's resolution.
    """
    m = fine.shape[1] - 2
    grid_edges = np.linspace(lo, hi, m + 1)
    quantiles = np.linspace(0, 1, bins + 1)[1:-1]
    edges = np.array([[histogram_quantile(row, grid_edges, q) for q in quantiles] for row in fine])
    edges = np.maximum.accumulate(edges, axis=1)
    ranges = []
    for row in fine:
        nonzero = np.flatnonzero(row)
        first, last = int(nonzero[0]), int(nonzero[-1])
        ranges.append((lo if first == 0 else grid_edges[first - 1], hi if last > m else grid_edges[last]))
    return edges, np.array(ranges, dtype=np.float64)


@dataclass(frozen=True)
class DriftReference:
    """What the release's signed metadata says "normal" looks like (from federated bin counts)."""

    feature_edges: np.ndarray  # (n_features, k) inner edges, k + 1 bins per feature
    feature_proportions: np.ndarray  # (n_features, k + 1)
    feature_ranges: np.ndarray  # (n_features, 2): min and max seen in the reference
    score_edges: np.ndarray  # (m,) inner edges over the top-class score
    score_proportions: np.ndarray  # (m + 1,)
    n_classes: int

    def __post_init__(self) -> None:
        f, k = self.feature_edges.shape
        if self.feature_proportions.shape != (f, k + 1) or self.feature_ranges.shape != (f, 2):
            raise ValueError("reference arrays disagree on the number of features or bins")
        if self.score_proportions.shape != (len(self.score_edges) + 1,) or self.n_classes < 2:
            raise ValueError("score histogram or class count malformed")
        if any(np.isnan(a).any() for a in (self.feature_edges, self.feature_ranges, self.score_edges)):
            raise ValueError("bin edges and ranges must be numbers, not NaN")
        if np.any(np.diff(self.feature_edges, axis=1) < 0) or np.any(np.diff(self.score_edges) < 0):
            raise ValueError("bin edges must be non-decreasing")

    def lower_bounds(self, dtype: np.dtype[Any]) -> np.ndarray:
        """(k + 2, n_features) bounds b in `dtype` such that, for an x of that dtype, x >= b[i] holds exactly when
        x >= inner edge i (i < k), when x >= the range's low (i = k), and when x > the range's high (i = k + 1).

        float32 inputs (a TFLite model's) are compared in float32: for a float32 x, x >= e exactly when x >= the
        smallest float32 >= e, and x > h exactly when x >= the float32 after the largest float32 <= h. A NaN x
        compares false against every bound, so it lands in no bin and counts as neither below nor above."""
        if np.dtype(dtype) == np.float32:
            edges = _float32_toward(self.feature_edges, np.inf).T
            low = _float32_toward(self.feature_ranges[:, 0], np.inf)
            high = _float32_toward(self.feature_ranges[:, 1], -np.inf)
        else:
            edges, low, high = self.feature_edges.T, self.feature_ranges[:, 0], self.feature_ranges[:, 1]
        kind = edges.dtype.type
        above = np.where(np.isposinf(high), kind(np.nan), np.nextafter(high, kind(np.inf)))  # nothing is above +inf
        return np.vstack([edges, low[None, :], above[None, :]])

    @functools.cached_property
    def _tile32(self) -> np.ndarray:
        return _tile(self.lower_bounds(np.dtype(np.float32)))

    @functools.cached_property
    def _tile64(self) -> np.ndarray:
        return _tile(self.lower_bounds(np.dtype(np.float64)))

    @classmethod
    def from_samples(
        cls, samples: np.ndarray, n_classes: int, bins: int = 10, scores: np.ndarray | None = None
    ) -> DriftReference:
        """A reference from samples held in one place (quantile edges per feature); uniform scores unless given.

        Federated training builds the same thing from pooled bin counts instead of samples.
        """
        x = np.asarray(samples, dtype=np.float64)
        edges = np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1], axis=0).T
        props = np.stack([proportions(bin_counts(x[:, j], edges[j])) for j in range(x.shape[1])])
        score_edges = np.linspace(0, 1, 11)[1:-1]
        score_props = np.full(10, 0.1) if scores is None else proportions(bin_counts(scores, score_edges))
        return cls(edges, props, np.stack([x.min(0), x.max(0)], axis=1), score_edges, score_props, n_classes)

    @classmethod
    @functools.cache  # one per class count: a fleet simulated in one process activates thousands of them
    def empty(cls, n_classes: int) -> DriftReference:
        """For a release without a drift reference: windows still count classes, scores, latency, errors."""
        return cls(
            np.zeros((0, 9)),
            np.zeros((0, 10)),
            np.zeros((0, 2)),
            np.linspace(0, 1, 11)[1:-1],
            np.full(10, 0.1),
            n_classes,
        )

    @property
    def n_features(self) -> int:
        return int(self.feature_edges.shape[0])

    @property
    def n_bins(self) -> int:
        return int(self.feature_edges.shape[1] + 1)

    def to_metadata(self) -> dict[str, Any]:
        """A form TUF canonical JSON can sign (no floats)."""
        return {
            "feature_edges": encode_array(self.feature_edges.astype(np.float64)),
            "feature_proportions": encode_array(self.feature_proportions.astype(np.float64)),
            "feature_ranges": encode_array(self.feature_ranges.astype(np.float64)),
            "score_edges": encode_array(self.score_edges.astype(np.float64)),
            "score_proportions": encode_array(self.score_proportions.astype(np.float64)),
            "n_classes": self.n_classes,
        }

    @classmethod
    def from_metadata(cls, doc: Any) -> DriftReference:
        if not isinstance(doc, dict):
            raise ValueError("drift reference must be an object")
        try:
            return cls(
                feature_edges=decode_array(doc["feature_edges"]).astype(np.float64),
                feature_proportions=decode_array(doc["feature_proportions"]).astype(np.float64),
                feature_ranges=decode_array(doc["feature_ranges"]).astype(np.float64),
                score_edges=decode_array(doc["score_edges"]).astype(np.float64),
                score_proportions=decode_array(doc["score_proportions"]).astype(np.float64),
                n_classes=int(doc["n_classes"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"drift reference lacks {e}") from e


def max_entropy(n_classes: int) -> float:
    """The most one inference adds to a window's entropy_sum: -sum p ln p with each p clipped to [1e-12, 1] is at
    most n_classes / e (each term at most 1/e), whether the outputs are normalised or not."""
    return n_classes / math.e


def _cap_total(counts: np.ndarray, total: int) -> np.ndarray:
    """Non-negative counts scaled down (rounding down) so that they add up to at most `total`."""
    c = np.asarray(counts, dtype=np.int64)
    s = int(c.sum())
    if s <= total:
        return c
    capped: np.ndarray = np.floor(c * (max(total, 0) / s)).astype(np.int64)
    return capped


@dataclass(frozen=True)
class WindowNoise:
    """How a window's counts were noised on the device (edge_agent.contract.windows.noised), and the device's
    monitoring budget as it stood after the window.

    Merging adds: a summary of several windows, or a pool of many, spent the sum of their ε, and its counts carry
    the sum of their noise variances. The budget fields describe one device's budget: in a summary of one
    device's consecutive windows (`other` the later one) they are the later window's; pooled across devices they
    mean nothing and are not read."""

    epsilon: float  # ε spent (0: no noise: a marker that the budget is spent)
    scale: float  # Laplace scale b on each count; a merge: sqrt(sum of b²), one Laplace with the same variance
    spent_epsilon: float = 0.0  # the device's monitoring ε spent so far, this window included
    budget_epsilon: float = 0.0  # the device's monitoring budget
    exhausted: bool = False  # the device sends no more noised windows until its budget is raised

    @property
    def variance(self) -> float:
        """The noise variance on each count: 2b² for Laplace(b)."""
        return 2.0 * self.scale * self.scale

    def merge(self, other: WindowNoise | None) -> WindowNoise:
        if other is None:
            return self
        return WindowNoise(
            epsilon=self.epsilon + other.epsilon,
            scale=float(np.hypot(self.scale, other.scale)),
            spent_epsilon=max(self.spent_epsilon, other.spent_epsilon),
            budget_epsilon=other.budget_epsilon,
            exhausted=other.exhausted,
        )


@dataclass
class WindowCounts:
    """Raw, poolable counts of one window (or of many pooled windows)."""

    feature_counts: np.ndarray  # (n_features, n_bins) int64
    nan_counts: np.ndarray  # (n_features,)
    out_of_range: np.ndarray  # (n_features,): below the reference's min or above its max
    score_counts: np.ndarray  # (n_score_bins,)
    class_counts: np.ndarray  # (n_classes,)
    latency_counts: np.ndarray = field(default_factory=lambda: np.zeros(len(LATENCY_EDGES_MS) + 1, np.int64))
    entropy_sum: float = 0.0
    latency_max_ms: float = 0.0
    inferences: int = 0
    errors: int = 0
    # Data quality against the release's input schema (edge_agent/contract/schema.py): inputs checked, and of those
    # the non-finite ones and the (finite) ones outside the valid range. Zero checked: no schema to check against.
    inputs_checked: int = 0
    inputs_nonfinite: int = 0
    inputs_out_of_range: int = 0
    noise: WindowNoise | None = None  # None: exact counts (no differential privacy on the device)

    @classmethod
    def empty(cls, reference: DriftReference) -> WindowCounts:
        f = reference.n_features
        return cls(
            feature_counts=np.zeros((f, reference.n_bins), np.int64),
            nan_counts=np.zeros(f, np.int64),
            out_of_range=np.zeros(f, np.int64),
            score_counts=np.zeros(len(reference.score_edges) + 1, np.int64),
            class_counts=np.zeros(reference.n_classes, np.int64),
        )

    def add(
        self,
        reference: DriftReference,
        inputs: np.ndarray,
        probabilities: np.ndarray,
        latencies_ms: Sequence[float] | np.ndarray,
    ) -> None:
        """Account for a batch: inputs (n, n_features), output probabilities (n, n_classes)."""
        p = np.asarray(probabilities, dtype=np.float64).reshape(-1, reference.n_classes)
        x = np.asarray(inputs).reshape(len(p), -1)
        if x.dtype != np.float32:  # float32 (a TFLite model's input) is compared as is, exactly; others in float64
            x = x.astype(np.float64, copy=False)
        if not reference.n_features:
            x = x[:, :0]  # a release without a drift reference: no feature bins, the rest still counts
        elif x.shape[1] != reference.n_features:
            raise ValueError(f"{x.shape[1]} input features, the reference has {reference.n_features}")
        if reference.n_features:
            tile = reference._tile32 if x.dtype == np.float32 else reference._tile64
            # Per feature, how many values reach each bound: all features and bounds of up to _CHUNK rows in one
            # comparison against the bounds tiled row by row, summed over the rows by one matrix-vector product
            # (exact: float32 holds integers far beyond _CHUNK).
            reach = np.zeros(tile.shape[::2])
            for start in range(0, len(x), _CHUNK):
                rows = x[start : start + _CHUNK]
                reach += _ONES[: len(rows)] @ (rows >= tile[:, : len(rows)]).astype(np.float32)
            reached = np.rint(reach).astype(np.int64)
            valid = np.full(reference.n_features, len(x), np.int64)
            nan = np.isnan(x)
            if nan.any():
                per_feature = nan.sum(axis=0)
                self.nan_counts += per_feature
                valid -= per_feature
            k = reference.n_bins - 1
            # A bin holds the values that reach its lower edge but not its upper one (edges are non-decreasing).
            at_least = np.vstack([valid[None, :], reached[:k], np.zeros((1, reference.n_features), np.int64)])
            self.feature_counts += (at_least[:-1] - at_least[1:]).T
            self.out_of_range += (valid - reached[k]) + reached[k + 1]
        predicted = p.argmax(axis=1)
        top = p[np.arange(len(p)), predicted]  # (indexing by the argmax is several times faster than max(axis=1))
        self.score_counts += bin_counts(top, reference.score_edges)
        self.class_counts += np.bincount(predicted, minlength=reference.n_classes)
        safe = np.minimum(np.maximum(p, 1e-12), 1.0).ravel()
        entropy = float(np.dot(safe, np.log(safe)))
        if not np.isfinite(entropy):  # a NaN output (from a NaN input, say) adds nothing, not a NaN window
            safe = np.minimum(np.maximum(np.nan_to_num(p, nan=0.0), 1e-12), 1.0).ravel()
            entropy = float(np.dot(safe, np.log(safe)))
        self.entropy_sum -= entropy
        lat = np.asarray(latencies_ms, dtype=np.float64)
        self.latency_counts += bin_counts(lat, LATENCY_EDGES_MS)
        if lat.size:
            self.latency_max_ms = max(self.latency_max_ms, float(lat.max()))
        self.inferences += len(x)

    def clamped(self) -> WindowCounts:
        """Noised counts (which may be negative) made a valid window: every count >= 0, the inferences the sum of
        the classes, no more latencies than inferences nor more inputs checked, no more inputs breaking the schema
        than checked, entropy within what that many inferences can hold, the largest latency read from the
        histogram. Post-processing: it costs no ε. Exact counts (a budget-spent marker's included) are returned as
        they are."""
        if self.noise is None or self.noise.variance <= 0:
            return self
        classes = np.maximum(self.class_counts, 0)
        inferences = int(classes.sum())
        latency = _cap_total(np.maximum(self.latency_counts, 0), inferences)
        top = np.flatnonzero(latency)
        upper_edges = np.append(LATENCY_EDGES_MS, LATENCY_EDGES_MS[-1])  # the open top bin: its lower edge
        checked = min(max(self.inputs_checked, 0), inferences)
        broken = _cap_total(np.maximum([self.inputs_nonfinite, self.inputs_out_of_range], 0), checked)
        return replace(
            self,
            feature_counts=np.maximum(self.feature_counts, 0),
            nan_counts=np.maximum(self.nan_counts, 0),
            out_of_range=np.maximum(self.out_of_range, 0),
            score_counts=np.maximum(self.score_counts, 0),
            class_counts=classes,
            latency_counts=latency,
            entropy_sum=min(max(self.entropy_sum, 0.0), inferences * max_entropy(self.class_counts.size)),
            latency_max_ms=float(upper_edges[top[-1]]) if top.size else 0.0,
            inferences=inferences,
            errors=max(self.errors, 0),
            inputs_checked=checked,
            inputs_nonfinite=int(broken[0]),
            inputs_out_of_range=int(broken[1]),
        )

    def merge(self, other: WindowCounts) -> WindowCounts:
        """The counts of both windows together (pooling across windows, devices or cohorts)."""
        return WindowCounts(
            feature_counts=self.feature_counts + other.feature_counts,
            nan_counts=self.nan_counts + other.nan_counts,
            out_of_range=self.out_of_range + other.out_of_range,
            score_counts=self.score_counts + other.score_counts,
            class_counts=self.class_counts + other.class_counts,
            latency_counts=self.latency_counts + other.latency_counts,
            entropy_sum=self.entropy_sum + other.entropy_sum,
            latency_max_ms=max(self.latency_max_ms, other.latency_max_ms),
            inferences=self.inferences + other.inferences,
            errors=self.errors + other.errors,
            inputs_checked=self.inputs_checked + other.inputs_checked,
            inputs_nonfinite=self.inputs_nonfinite + other.inputs_nonfinite,
            inputs_out_of_range=self.inputs_out_of_range + other.inputs_out_of_range,
            noise=other.noise if self.noise is None else self.noise.merge(other.noise),
        )


def effective_samples(counts: WindowCounts, samples: int | None = None) -> int:
    """What `samples` of these counts (default: their inferences) are worth once the noise is taken into account:
    the number of exact samples whose histograms would be as precise. Exact counts are worth what they count.

    Derivation: a histogram of k bins over N samples, its counts each carrying independent noise of variance
    s² (2b² for Laplace(b), summed over pooled windows), estimates the proportions p_i = n_i / N. Drift
    statistics (PSI, KL) are, for small shifts, chi-square distances sum (q_i - p_i)² / p_i, whose expected
    value over sampling and noise is

        sum_i [p_i (1 - p_i) / N + s² / N²] / p_i  =  (k - 1) / N + s² k² / N²

    at the reference's quantile bins (p_i = 1/k, what they are built to hold; the observed noisy counts would
    make the figure itself noisy, and unbounded near empty bins). Exact samples give (k - 1) / n, so the noised
    counts are worth

        n_eff = N / (1 + s² k² / ((k - 1) N))

    with k the widest histogram the window publishes (feature bins, score bins or classes): the strictest."""
    n = counts.inferences if samples is None else samples
    if counts.noise is None or counts.noise.variance <= 0:
        return int(n)
    if n <= 0:
        return 0
    k = max(counts.feature_counts.shape[1] if counts.feature_counts.ndim == 2 else 0, counts.score_counts.size)
    k = max(k, counts.class_counts.size, 2)
    return int(n / (1.0 + counts.noise.variance * k * k / ((k - 1) * n)))


@dataclass(frozen=True)
class WindowScore:
    feature_psi: np.ndarray
    feature_kl: np.ndarray  # KL(current || reference)
    max_psi: float
    mean_psi: float
    score_psi: float
    class_mix: np.ndarray  # predicted-class proportions (unfloored)
    mean_entropy: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_max_ms: float
    samples: int


def score_window(window: WindowCounts, reference: DriftReference, min_samples: int | None = None) -> WindowScore | None:
    """Score a window against the reference, or None if it has too few samples to say anything."""
    needed = 10 * reference.n_bins if min_samples is None else min_samples
    if window.noise is not None and window.noise.variance > 0:  # noised counts are worth fewer samples
        window = window.clamped()
        samples = int(window.feature_counts.sum(axis=1).min()) if reference.n_features else 0
        if effective_samples(window) < needed or effective_samples(window, samples) < needed:
            return None
        if not window.score_counts.sum():  # every score bin's noisy count clamped to zero
            return None
    samples = int(window.feature_counts.sum(axis=1).min()) if reference.n_features else 0
    if window.inferences < needed or samples < needed or samples == 0:
        return None
    cur = proportions(window.feature_counts)
    ref = np.maximum(reference.feature_proportions, MIN_PROPORTION)
    log_ratio = np.log(cur / ref)  # every feature at once: psi() and kl() row by row, without the loop
    feature_psi = ((cur - ref) * log_ratio).sum(axis=1)
    feature_kl = (cur * log_ratio).sum(axis=1)
    score_psi = psi(np.maximum(reference.score_proportions, MIN_PROPORTION), proportions(window.score_counts))
    return WindowScore(
        feature_psi=feature_psi,
        feature_kl=feature_kl,
        max_psi=float(feature_psi.max()),
        mean_psi=float(feature_psi.mean()),
        score_psi=score_psi,
        class_mix=window.class_counts / max(1, window.class_counts.sum()),
        mean_entropy=window.entropy_sum / window.inferences,
        latency_p50_ms=histogram_quantile(window.latency_counts, LATENCY_EDGES_MS, 0.5),
        latency_p95_ms=histogram_quantile(window.latency_counts, LATENCY_EDGES_MS, 0.95),
        latency_max_ms=window.latency_max_ms,
        samples=samples,
    )
