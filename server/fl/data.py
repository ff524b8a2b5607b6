"""Where a client's training data comes from, behind one small interface.

`DigitsPartition` is scikit-learn's bundled handwritten digits (real data shipped with the package; nothing is
downloaded), split across N devices non-IID with a Dirichlet over labels and a held-out test split kept by the
coordinator. `NpzFiles` is a device's own data on its disk (a Raspberry Pi's camera crops, say) in the same shape.
A client picks its source from its node config (`data-source = "digits"` or `"npz:/path/to/data.npz"`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from server.errors import CoordinatorError

__all__ = [
    "CLASSES",
    "FEATURES",
    "FEATURE_RANGE",
    "DataSource",
    "DigitsPartition",
    "NpzFiles",
    "digits_split",
    "held_out",
    "source_from_config",
]

FEATURES, CLASSES = 64, 10
FEATURE_RANGE = (0.0, 1.0)  # digits pixels are 0..16, scaled to [0, 1]
TEST_FRACTION = 0.2
MIN_PER_DEVICE = 8


class DataError(CoordinatorError):
    """A data source cannot give what training needs."""


class DataSource(Protocol):
    """A client's local examples: inputs (n, FEATURES) float32 in FEATURE_RANGE and labels (n,) int64."""

    @property
    def name(self) -> str: ...

    def load(self) -> tuple[np.ndarray, np.ndarray]: ...


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def _split_indices(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out indices, stratified per class, fixed by the seed."""
    _, y = _digits()
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        cut = round(len(idx) * TEST_FRACTION)
        test.append(idx[:cut])
        train.append(idx[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def held_out(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The coordinator's test split: never given to a client."""
    x, y = _digits()
    _, test = _split_indices(seed)
    return x[test], y[test]


@functools.lru_cache(maxsize=8)
def digits_split(n_devices: int, alpha: float, seed: int) -> tuple[tuple[int, ...], ...]:
    """Row indices of each device's share of the training split: per class, shares drawn from Dirichlet(alpha).

    Small alpha gives each device few classes (non-IID); large alpha approaches an even split. Draws repeat until
    every device holds at least MIN_PER_DEVICE examples (bounded; a fleet too large for the data is an error).
    """
    if n_devices < 1:
        raise DataError("the split needs at least one device")
    if not alpha > 0:
        raise DataError(f"alpha must be > 0 (got {alpha})")
    _, y = _digits()
    train, _ = _split_indices(seed)
    if n_devices * MIN_PER_DEVICE > len(train):
        raise DataError(f"{len(train)} training digits cannot give {n_devices} devices {MIN_PER_DEVICE} each")
    rng = np.random.default_rng([seed, n_devices])
    for _attempt in range(200):
        parts: list[list[int]] = [[] for _ in range(n_devices)]
        for c in range(CLASSES):
            idx = rng.permutation(train[y[train] == c])
            shares = rng.dirichlet(np.full(n_devices, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for device, chunk in enumerate(np.split(idx, cuts)):
                parts[device].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= MIN_PER_DEVICE:
            return tuple(tuple(sorted(p)) for p in parts)
    raise DataError(f"no Dirichlet(alpha={alpha}) split gave each of {n_devices} devices {MIN_PER_DEVICE} examples")


@dataclass(frozen=True)
class DigitsPartition:
    """Device `partition` of `num_partitions` in the non-IID digits split."""

    partition: int
    num_partitions: int
    alpha: float = 0.5
    seed: int = 0

    @property
    def name(self) -> str:
        return f"digits[{self.partition}/{self.num_partitions}, alpha={self.alpha}, seed={self.seed}]"

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= self.partition < self.num_partitions:
            raise DataError(f"partition {self.partition} is outside 0..{self.num_partitions - 1}")
        x, y = _digits()
        rows = np.array(digits_split(self.num_partitions, self.alpha, self.seed)[self.partition])
        return x[rows], y[rows]


@dataclass(frozen=True)
class NpzFiles:
    """A device's own examples: an .npz file with arrays `x` (n, 64) in [0, 1] and `y` (n,) class labels."""

    path: Path

    @property
    def name(self) -> str:
        return f"npz:{self.path}"

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            with np.load(self.path) as f:
                x, y = np.asarray(f["x"], dtype=np.float32), np.asarray(f["y"], dtype=np.int64)
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"cannot read training data {self.path}: {e}") from e
        if x.ndim != 2 or x.shape[1] != FEATURES or len(x) != len(y) or len(x) == 0:
            raise DataError(f"{self.path}: x must be (n, {FEATURES}) and y (n,), n > 0; got {x.shape} and {y.shape}")
        if y.min() < 0 or y.max() >= CLASSES:
            raise DataError(f"{self.path}: labels must lie in 0..{CLASSES - 1}")
        return x, y


def source_from_config(spec: str, partition: int, num_partitions: int, alpha: float, seed: int) -> DataSource:
    """`digits` (this node's partition of the split) or `npz:PATH`."""
    if spec == "digits":
        return DigitsPartition(partition, num_partitions, alpha, seed)
    if spec.startswith("npz:"):
        return NpzFiles(Path(spec[4:]))
    raise DataError(f"unknown data source {spec!r}: use 'digits' or 'npz:PATH'")
