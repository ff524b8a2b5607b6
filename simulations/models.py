"""Models for rehearsals until federated training provides trained ones: a seeded dense network over 64 inputs
(the digits shape) and its variants — a healthy update (tiny weight changes) and a degraded one (output classes
scrambled) — each released with a drift reference computed from the inputs devices will see.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from edge_agent.contract.drift import DriftReference
from edge_agent.runtime import load_model
from simulations.dense_tflite import DenseLayer, build_dense_model, random_dense_layers

__all__ = ["CLASSES", "FEATURES", "ModelFamily", "drift_reference", "reference_inputs"]

FEATURES, CLASSES = 64, 10


def reference_inputs(n: int, seed: int) -> np.ndarray:
    """Inputs as a healthy sensor gives them: 64 features in [0, 1)."""
    return np.random.default_rng(seed).random((n, FEATURES), dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    seed: int = 1

    def layers(self) -> list[DenseLayer]:
        return random_dense_layers([FEATURES, 32, CLASSES], self.seed)

    def base(self) -> bytes:
        return build_dense_model(self.layers())

    def healthy_update(self, step: int = 1) -> bytes:
        """The same network with weights nudged by 0.5%: predictions barely move."""
        rng = np.random.default_rng(self.seed * 1000 + step)
        return build_dense_model(
            [
                dataclasses.replace(
                    layer, weights=layer.weights + rng.normal(0, 0.005, layer.weights.shape).astype(np.float32)
                )
                for layer in self.layers()
            ]
        )

    def scrambled(self) -> bytes:
        """A broken build: the output layer's rows rotated, so every prediction names another class."""
        *hidden, last = self.layers()
        return build_dense_model(
            [*hidden, dataclasses.replace(last, weights=np.roll(last.weights, 3, axis=0), bias=np.roll(last.bias, 3))]
        )


def drift_reference(model: bytes, samples: np.ndarray) -> DriftReference:
    """The reference a release carries: per-feature quantile bins of `samples` and the model's top-class scores."""
    with tempfile.NamedTemporaryFile(suffix=".tflite") as f:
        f.write(model)
        f.flush()
        m = load_model(Path(f.name))
        scores = np.array([float(m.predict(x[None]).max()) for x in samples])
    return DriftReference.from_samples(samples, CLASSES, scores=scores)
