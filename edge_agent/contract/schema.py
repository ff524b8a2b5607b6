"""A release's input schema and the data-quality check an agent makes against it.

The release's signed metadata carries it as `custom["schema"]["input"]`: the input tensor's shape and dtype and,
per feature, the valid range (`valid_range`, an encoded (n_features, 2) array of low and high; see
edge_agent/contract/arrays.py). The range is public knowledge about the data (digits' pixels lie in [0, 1] once
scaled), never a statistic of one device's data. The agent counts, per telemetry window, the inputs that break
the schema — each input once: non-finite (a NaN or an infinity in any feature) first, else a finite value outside
its feature's range — and serves them all the same: counting is the coordinator's evidence, not a filter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.contract.arrays import decode_array, encode_array

__all__ = ["InputSchema"]


@dataclass(frozen=True)
class InputSchema:
    shape: tuple[int, ...]  # the model's input tensor, batch dimension included
    dtype: str
    low: np.ndarray  # (n_features,) float64: the lowest valid value of each feature
    high: np.ndarray  # (n_features,) float64: the highest

    def __post_init__(self) -> None:
        if self.low.shape != self.high.shape or self.low.ndim != 1:
            raise ValueError("valid range must give one low and one high per feature")
        if np.isnan(self.low).any() or np.isnan(self.high).any() or np.any(self.low > self.high):
            raise ValueError("valid range must be numbers with low <= high")
        features = int(np.prod(self.shape[1:])) if len(self.shape) > 1 else int(np.prod(self.shape))
        if features != self.n_features:
            raise ValueError(
                f"valid range covers {self.n_features} features, the input shape {list(self.shape)} has {features}"
            )

    @property
    def n_features(self) -> int:
        return int(self.low.shape[0])

    @classmethod
    def uniform(cls, shape: tuple[int, ...], dtype: str, low: float, high: float) -> InputSchema:
        """Every feature valid in the same [low, high] (public bounds such as a pixel's)."""
        n = int(np.prod(shape[1:])) if len(shape) > 1 else int(np.prod(shape))
        return cls(shape, dtype, np.full(n, float(low)), np.full(n, float(high)))

    def to_metadata(self) -> dict[str, Any]:
        """The `schema.input` entry of a release's signed metadata (canonical JSON: no floats)."""
        return {
            "shape": [int(d) for d in self.shape],
            "dtype": self.dtype,
            "valid_range": encode_array(np.stack([self.low, self.high], axis=1).astype(np.float64)),
        }

    @classmethod
    def from_metadata(cls, doc: Any) -> InputSchema | None:
        """The schema of a release's `schema.input`; None if it states no valid range (nothing to check against);
        ValueError if it is malformed."""
        if not isinstance(doc, Mapping):
            raise ValueError("an input schema must be an object")
        if "valid_range" not in doc:
            return None
        shape, dtype = doc.get("shape"), doc.get("dtype")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape) or not shape:
            raise ValueError("an input schema's shape must be a list of positive integers")
        if not isinstance(dtype, str):
            raise ValueError("an input schema's dtype must be a string")
        bounds = decode_array(doc["valid_range"]).astype(np.float64)
        if bounds.ndim != 2 or bounds.shape[1] != 2:
            raise ValueError("valid_range must be an (n_features, 2) array of low and high")
        return cls(tuple(shape), dtype, bounds[:, 0].copy(), bounds[:, 1].copy())

    def violations(self, inputs: np.ndarray) -> tuple[int, int]:
        """(non-finite, out of range) counts of a batch (n, n_features); each input counted once, non-finite
        first. An input of another width breaks the schema as a whole and counts as out of range."""
        x = np.asarray(inputs)
        if x.ndim != 2 or not len(x):
            return 0, 0
        if x.shape[1] != self.n_features:
            return 0, len(x)
        nonfinite = ~np.isfinite(x).all(axis=1)
        with np.errstate(invalid="ignore"):  # NaN compares false: counted as non-finite above
            outside = ((x < self.low) | (x > self.high)).any(axis=1)
        return int(nonfinite.sum()), int((outside & ~nonfinite).sum())
