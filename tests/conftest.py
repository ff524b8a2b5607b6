from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from server.datadir import DataDir
from server.dense_tflite import build_dense_model, random_dense_layers
from tests.support import Mosquitto

# CI runs the property and fuzz tests on a fixed example sequence so a landing never hinges on a random draw;
# locally each run explores new examples (HYPOTHESIS_PROFILE=ci reproduces CI).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI") or os.environ.get("HYPOTHESIS_PROFILE") == "ci":
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def model_bytes() -> dict[str, bytes]:
    """Two real TFLite models of the digits shape (64 inputs, 10 classes) with different weights."""
    return {v: build_dense_model(random_dense_layers([64, 32, 10], seed)) for v, seed in (("1.0.0", 1), ("2.0.0", 2))}


@pytest.fixture
def datadir(tmp_path: Path) -> DataDir:
    d, created = DataDir.init(tmp_path / "data")
    assert created
    return d
