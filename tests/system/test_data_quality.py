"""Data quality on real devices (issue 20): a real coordinator process (`fedfleet serve`, embedded broker) and two
real agent processes. One agent is fed NaN, infinite and out-of-range inputs through its local Infer endpoint:
it serves every one and reports them in its telemetry windows; a rollout gated on `invalid_input_rate` holds;
the coordinator raises `invalid_inputs` for the fleet, and `stale_data` for the other agent, which never infers."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2_grpc as pb_grpc
from edge_agent.contract.drift import DriftReference
from server.datadir import DataDir
from server.store.loop import AlertRecords
from server.trust.releases import publish_release
from tests.support import AgentProcess, CoordinatorProcess, enroll_agent, fedfleet, wait_for

FEATURES, CLASSES = 64, 10
STALE_AFTER = 20  # seconds without an inference before a device's data counts as stale


def _reference() -> dict[str, Any]:
    """A drift reference whose feature ranges are the public bounds [0, 1] (what a federated one carries)."""
    ref = DriftReference.from_samples(np.random.default_rng(0).random((3000, FEATURES)), CLASSES)
    return dataclasses.replace(ref, feature_ranges=np.tile([0.0, 1.0], (FEATURES, 1))).to_metadata()


def _ok(d: DataDir, *args: str) -> Any:
    out = fedfleet(d, *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def fleet(datadir: DataDir, model_bytes: dict[str, bytes], tmp_path: Path) -> Iterator[list[AgentProcess]]:
    (datadir.root / datadir.config().policy).write_text(
        f"[data_quality]\nstale_after_seconds = {STALE_AFTER}\nmax_invalid_input_rate = 0.05\n"
    )
    with datadir.store() as store:
        for version, data in model_bytes.items():
            publish_release(
                datadir.repository(), store, data, "digits", version, extra={"drift_reference": _reference()}
            )
    coordinator = CoordinatorProcess(datadir, None).start()
    agents = [
        enroll_agent(
            datadir,
            tmp_path / "devices",
            name,
            labels={"site": site},
            extra={"telemetry_every_inferences": 4, "telemetry_every_seconds": 1.0},
            coordinator=coordinator,
        ).start()
        for name, site in (("pi-1", "a"), ("pi-2", "b"))
    ]
    yield agents
    for a in agents:
        a.kill()
    coordinator.kill()


def _device(d: DataDir, device_id: str) -> dict[str, Any]:
    return next((r for r in _ok(d, "devices", "list") if r["id"] == device_id), {})


def _runs(d: DataDir, device_id: str, release: str) -> bool:
    row = _device(d, device_id)
    return row.get("running_release") == release and row.get("last_event") == "committed"


def _quality(d: DataDir, device_id: str, release: str) -> tuple[int, int, int, int]:
    """(inferences, checked, non-finite, out of range) summed over the device's stored windows of a release."""
    totals = [0, 0, 0, 0]
    with d.store() as store:
        for (payload,) in store.db.execute(
            "SELECT payload FROM telemetry WHERE device_id = ? AND release_id = ?", [device_id, release]
        ):
            m = pb.TelemetryWindow.FromString(payload)
            for i, v in enumerate((m.inferences, m.inputs_checked, m.inputs_nonfinite, m.inputs_out_of_range)):
                totals[i] += v
    return totals[0], totals[1], totals[2], totals[3]


def _inputs() -> np.ndarray:
    """12 inputs: 6 valid, 2 with a NaN, 1 with an infinity, 3 out of the valid range (raw 0..16 pixels)."""
    x = np.random.default_rng(3).random((12, FEATURES)).astype(np.float32)
    x[6, 5] = np.nan
    x[7, 40] = np.nan
    x[8, 0] = -np.inf
    x[9] *= 16.0
    x[10, 12] = 2.5
    x[11, 63] = -1.0
    return x


def _alerts_raised(d: DataDir) -> dict[str, dict[str, Any]]:
    """The newest alert of each kind, open or not: `invalid_inputs` looks at windows within the same bound after
    which a device counts as stale, so one burst of bad inputs is resolved again about when `stale_data` opens."""
    with d.store() as store:
        return {a["kind"]: a for a in reversed(AlertRecords(store).recent())}


@pytest.mark.slow
def test_bad_inputs_are_served_reported_held_at_the_gate_and_a_silent_device_is_stale(
    fleet: list[AgentProcess], datadir: DataDir
) -> None:
    pi1, _ = fleet
    _ok(datadir, "assign", "--fleet", "lab", "digits@1.0.0")
    for device in ("pi-1", "pi-2"):
        wait_for(lambda device=device: _runs(datadir, device, "digits@1.0.0"), 60, what=f"{device} on 1.0.0")
    rollout = _ok(
        datadir,
        "rollout",
        "start",
        "digits@2.0.0",
        "--label",
        "site=a",
        "--canary",
        "1",
        "--waves",
        "1.0",
        "--bake",
        "1",
        "--min-samples",
        "8",
        "--gate",
        "invalid_input_rate<=0.05",
        "--on-fail",
        "hold",
    )
    wait_for(lambda: _runs(datadir, "pi-1", "digits@2.0.0"), 60, what="pi-1 on 2.0.0")

    # Execute: the application on pi-1 sends 12 inputs, 6 of them broken, through the agent's local endpoint
    with grpc.insecure_channel(pi1.config.local_endpoint) as channel:
        stub = pb_grpc.AgentLocalStub(channel)
        answers = [stub.Infer(pb.InferRequest(input=x.tolist()), timeout=10) for x in _inputs()]

    # Assert: every input was served (no refusal), by the release under rollout
    assert [a.release_id for a in answers] == ["digits@2.0.0"] * 12
    assert all(len(a.output) == CLASSES for a in answers)
    # ... and its windows, stored by the coordinator, count what broke the schema
    wait_for(lambda: _quality(datadir, "pi-1", "digits@2.0.0")[0] == 12, 60, what="12 inferences stored")
    assert _quality(datadir, "pi-1", "digits@2.0.0") == (12, 12, 3, 3)

    # ... the gate on invalid_input_rate holds the rollout at its wave, naming the metric and its value
    def held() -> dict[str, Any] | None:
        status = _ok(datadir, "rollout", "status", rollout["id"])
        return status if status["last_decision"].startswith("hold") else None

    status = wait_for(held, 60, what="the rollout held by its gate")
    assert status["phase"] == "gating"
    gate = next(g for g in status["gates"] if g["metric"] == "invalid_input_rate")
    assert gate["verdict"] == "fail" and gate["value"] == pytest.approx(0.5)

    # ... the fleet's invalid inputs raise an alert; pi-2, which never infers, is flagged as stale data
    def alerted() -> dict[str, dict[str, Any]] | None:
        alerts = _alerts_raised(datadir)
        stale = alerts.get("stale_data")
        return alerts if "invalid_inputs" in alerts and stale and stale["state"] == "open" else None

    alerts = wait_for(alerted, 90, what="invalid_inputs and stale_data alerts")
    invalid = alerts["invalid_inputs"]["detail"]
    assert invalid["devices"] == ["pi-1"] and invalid["inputs_nonfinite"] == 3 and invalid["inputs_out_of_range"] == 3
    assert invalid["invalid_input_rate"] == pytest.approx(0.5)
    assert "pi-2" in alerts["stale_data"]["detail"]["devices"]
