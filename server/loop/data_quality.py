"""Data-quality alerts: per fleet, inputs that break their release's input schema more often than the policy allows
(`invalid_inputs`), and devices whose inference count stayed at zero for the policy's freshness bound
(`stale_data`). Both read the telemetry devices sent; the metrics are server.rollout.metrics'."""

from __future__ import annotations

from collections import defaultdict

from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.windows import counts_from_proto
from server.loop.alerts import Alerts
from server.loop.kinds import AlertKind
from server.policy import Policy
from server.rollout.metrics import invalid_input_rate
from server.store import Store
from server.store.telemetry import TelemetryRecords

__all__ = ["DataQualityWatch"]


class DataQualityWatch:
    def __init__(self, store: Store, alerts: Alerts, policy: Policy) -> None:
        self.store, self.alerts, self.policy = store, alerts, policy

    def tick(self, now: int) -> None:
        bound_ms = int(self.policy.data_stale_after_seconds * 1000)
        self._invalid_inputs(now - bound_ms)
        self._stale(now - bound_ms)

    def _invalid_inputs(self, since_ms: int) -> None:
        """Per fleet, the schema-breaking share of the inputs checked in windows that ended within the bound."""
        fleets = {d["id"]: d["fleet"] for d in self.store.devices()}
        checked: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # checked, non-finite, out of range
        devices: dict[str, set[str]] = defaultdict(set)
        for device_id, payload in TelemetryRecords(self.store).payloads_since(since_ms):
            try:
                counts = counts_from_proto(pb.TelemetryWindow.FromString(payload))
            except ValueError:
                continue  # stored windows were checked on the way in; an old malformed one says nothing here
            if not counts.inputs_nonfinite + counts.inputs_out_of_range and not counts.inputs_checked:
                continue
            tally = checked[fleets.get(device_id, "")]
            tally[0] += counts.inputs_checked
            tally[1] += counts.inputs_nonfinite
            tally[2] += counts.inputs_out_of_range
            if counts.inputs_nonfinite + counts.inputs_out_of_range:
                devices[fleets.get(device_id, "")].add(device_id)
        limit = self.policy.data_max_invalid_input_rate
        raised = set()
        for fleet, (n, nonfinite, out_of_range) in checked.items():
            rate = invalid_input_rate(n, nonfinite, out_of_range)
            if rate is None or rate <= limit:
                continue
            key = f"invalid:{fleet}"
            raised.add(key)
            self.alerts.raise_alert(
                AlertKind.INVALID_INPUTS,
                fleet,
                key,
                f"{rate:.1%} of fleet {fleet}'s inputs break their release's input schema ({nonfinite} non-finite, "
                f"{out_of_range} out of range of {n} checked; the policy allows {limit:.1%})",
                {
                    "fleet": fleet,
                    "invalid_input_rate": rate,
                    "inputs_checked": n,
                    "inputs_nonfinite": nonfinite,
                    "inputs_out_of_range": out_of_range,
                    "devices": sorted(devices[fleet])[:50],
                },
            )
        self.alerts.resolve_all_but("invalid:", raised, "the fleet's inputs fit their schema again")

    def _stale(self, cutoff_ms: int) -> None:
        by_fleet: dict[str, list[str]] = defaultdict(list)
        for r in TelemetryRecords(self.store).stale_data_devices(cutoff_ms):
            by_fleet[r["fleet"]].append(r["device_id"])
        for fleet, ids in by_fleet.items():
            self.alerts.raise_alert(
                AlertKind.STALE_DATA,
                fleet,
                f"stale-data:{fleet}",
                f"{len(ids)} device(s) of fleet {fleet} made no inference for over "
                f"{self.policy.data_stale_after_seconds:g} s (stale data)",
                {"fleet": fleet, "devices": ids[:50], "count": len(ids)},
            )
        self.alerts.resolve_all_but(
            "stale-data:", {f"stale-data:{f}" for f in by_fleet}, "every device of the fleet infers again"
        )
