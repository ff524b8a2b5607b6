"""Data-quality checks on the device: a release's input schema, the counts a telemetry window carries of the inputs
that break it, their wire form (old agents and coordinators stay compatible), and the metric computed from them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.drift import DriftReference
from edge_agent.contract.schema import InputSchema
from edge_agent.contract.windows import ClosedWindow, counts_from_proto, window_to_proto
from edge_agent.telemetry import TelemetryRecorder
from server.rollout.metrics import METRICS, MetricKind, invalid_input_rate, telemetry_values

FEATURES, CLASSES = 64, 10
SCHEMA = InputSchema.uniform((1, FEATURES), "float32", 0.0, 1.0)


def _reference() -> DriftReference:
    ref = DriftReference.from_samples(np.random.default_rng(0).random((2000, FEATURES)), CLASSES)
    return dataclasses.replace(ref, feature_ranges=np.tile([0.0, 1.0], (FEATURES, 1)))


def _bad_inputs() -> np.ndarray:
    """10 inputs: 4 valid, 2 with a NaN, 1 with an infinity, 1 NaN and out of range at once, 2 out of range."""
    x = np.random.default_rng(1).random((10, FEATURES)).astype(np.float32)
    x[4, 3] = np.nan
    x[5, 0] = np.nan
    x[6, 63] = np.inf
    x[7, 1], x[7, 2] = np.nan, 7.0
    x[8, 10] = 16.0  # a raw pixel where the model expects [0, 1]
    x[9, 20] = -0.5
    return x


def test_a_schema_round_trips_through_signed_metadata_and_counts_each_input_once() -> None:
    # Execute
    doc = SCHEMA.to_metadata()
    back = InputSchema.from_metadata(doc)
    counts = SCHEMA.violations(_bad_inputs())

    # Assert
    assert back is not None and back.shape == (1, FEATURES) and back.dtype == "float32"
    assert np.array_equal(back.low, SCHEMA.low) and np.array_equal(back.high, SCHEMA.high)
    assert all(not isinstance(v, float) for v in doc.values())  # canonical JSON carries no floats
    assert counts == (4, 2)  # non-finite first (the NaN-and-out-of-range one is non-finite)
    assert SCHEMA.violations(np.zeros((3, 5), np.float32)) == (0, 3)  # another width breaks the schema whole
    assert InputSchema.from_metadata({"shape": [1, FEATURES], "dtype": "float32"}) is None  # nothing to check


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("not a schema", "must be an object"),
        ({"shape": [1, 3], "dtype": "float32", "valid_range": {"dtype": "float64", "shape": [3], "b64": ""}}, "bytes"),
        ({"shape": [1, -3], "dtype": "float32", "valid_range": {}}, "positive integers"),
    ],
)
def test_a_malformed_schema_is_refused(doc: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InputSchema.from_metadata(doc)


def test_a_schema_whose_range_does_not_fit_its_shape_or_order_is_refused() -> None:
    with pytest.raises(ValueError, match="covers 3 features"):
        InputSchema((1, FEATURES), "float32", np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="low <= high"):
        InputSchema((1, 2), "float32", np.ones(2), np.zeros(2))


def test_the_recorder_counts_bad_inputs_per_window_and_serves_them_all() -> None:
    # Prepare: windows close every 10 inferences
    closed: list[ClosedWindow] = []
    recorder = TelemetryRecorder(closed.append, every_inferences=10, every_seconds=3600)
    recorder.switch("digits@1.0.0", _reference(), SCHEMA)
    probs = np.full(CLASSES, 0.1, np.float32)

    # Execute: one at a time, as the agent records (its serving lock held); then a window without a schema
    with recorder.lock:
        for x in _bad_inputs():
            recorder.record_one("digits@1.0.0", x, probs, 0.3)
    recorder.switch("digits@0.9.0", _reference())
    with recorder.lock:
        for x in _bad_inputs():
            recorder.record_one("digits@0.9.0", x, probs, 0.3)
    recorder.close()

    # Assert: every input was counted as an inference; the checked window says which broke the schema
    checked, unchecked = closed
    assert checked.counts.inferences == 10
    assert (checked.counts.inputs_checked, checked.counts.inputs_nonfinite, checked.counts.inputs_out_of_range) == (
        10,
        4,
        2,
    )
    assert unchecked.counts.inferences == 10 and unchecked.counts.inputs_checked == 0


def test_the_counts_travel_in_the_window_and_an_old_agent_window_still_parses() -> None:
    closed: list[ClosedWindow] = []
    recorder = TelemetryRecorder(closed.append, every_inferences=10, every_seconds=3600)
    recorder.switch("digits@1.0.0", _reference(), SCHEMA)
    recorder.record("digits@1.0.0", _bad_inputs(), np.full((10, CLASSES), 0.1), [0.3] * 10)

    # Execute
    message = pb.TelemetryWindow.FromString(window_to_proto(closed[0], "pi-1", 1).SerializeToString())
    counts = counts_from_proto(message)
    old = pb.TelemetryWindow()
    old.CopyFrom(message)
    old.ClearField("inputs_checked")
    old.ClearField("inputs_nonfinite")
    old.ClearField("inputs_out_of_range")

    # Assert
    assert (message.inputs_checked, message.inputs_nonfinite, message.inputs_out_of_range) == (10, 4, 2)
    assert invalid_input_rate(counts.inputs_checked, counts.inputs_nonfinite, counts.inputs_out_of_range) == 0.6
    old_counts = counts_from_proto(old)  # an agent from before: nothing checked, nothing judged
    assert old_counts.inputs_checked == 0
    assert telemetry_values(old_counts, None, old_counts)["invalid_input_rate"] is None
    assert telemetry_values(counts, None, counts)["invalid_input_rate"] == 0.6
    assert counts.merge(counts).inputs_nonfinite == 8


def test_inconsistent_quality_counts_are_refused() -> None:
    closed: list[ClosedWindow] = []
    recorder = TelemetryRecorder(closed.append, every_inferences=10, every_seconds=3600)
    recorder.switch("digits@1.0.0", _reference(), SCHEMA)
    recorder.record("digits@1.0.0", _bad_inputs(), np.full((10, CLASSES), 0.1), [0.3] * 10)
    for field, value in (("inputs_checked", 11), ("inputs_out_of_range", 7)):
        m = window_to_proto(closed[0], "pi-1", 1)
        setattr(m, field, value)
        with pytest.raises(ValueError, match="inputs checked against the schema exceed"):
            counts_from_proto(m)


def test_both_metrics_are_registered_once_as_fractions() -> None:
    assert METRICS["invalid_input_rate"].kind is MetricKind.WAVE and METRICS["invalid_input_rate"].fraction
    assert METRICS["stale_data_fraction"].kind is MetricKind.DEVICES and METRICS["stale_data_fraction"].fraction


def test_a_nan_output_leaves_the_window_valid() -> None:
    # Prepare: what a model gives for a NaN input: NaN probabilities
    closed: list[ClosedWindow] = []
    recorder = TelemetryRecorder(closed.append, every_inferences=2, every_seconds=3600)
    recorder.switch("digits@1.0.0", _reference(), SCHEMA)
    x = np.random.default_rng(2).random((2, FEATURES)).astype(np.float32)
    x[0, 0] = np.nan
    probs = np.full((2, CLASSES), 0.1)
    probs[0] = np.nan

    # Execute
    recorder.record("digits@1.0.0", x, probs, [0.3, 0.3])
    counts = counts_from_proto(window_to_proto(closed[0], "pi-1", 1))  # the coordinator's own check

    # Assert
    assert counts.inferences == 2 and counts.inputs_nonfinite == 1 and np.isfinite(counts.entropy_sum)
