"""Rollback: from the first telemetry that breaks a gate to every affected device back on its previous release,
next to the bare fan-out of the same kind of assignment messages, in the same run.

    python benchmarks/rollback.py --devices 100
    python benchmarks/rollback.py --devices 1000

One run, on Mosquitto: a coordinator process, N real agents inferring in this process (simulations/rig.py).
1. Bare fan-out: the fleet runs release B with release A still in its inactive slot; `fedfleet assign --fleet A`
   is timed until every device reports A committed. Each device gets one signed assignment, refreshes TUF
   metadata and finds the target already in its slot (no download): exactly what a rollback asks of a device.
2. Rollback: a scrambled release C is rolled out to every device at once (canary = N, bake 0) with the default
   gates. The clock starts at the moment the evidence broke the gate: when the last device had reported C
   committed and the wave's pooled windows reached min_samples (the engine judges nothing earlier), measured
   on the coordinator's receive clock (or at the decision, if a device's status beat its committed event).
   It stops when the last device has reported A committed again.

Both clocks read the coordinator's database (assignment created_at, event received_at, in ms), so neither
includes a CLI's start-up. Target: rollback <= one gate tick + 2 x bare fan-out. The last line is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from simulations.processes import Mosquitto, wait_for
from simulations.rig import RELEASES, Rig


def _committed_all(rig: Rig, release: str, n: int, timeout: float) -> None:
    rig.wait_running(release, n, timeout)


def _bare_fanout(rig: Rig, counters: dict[str, int]) -> float:
    """From the batch's signing (assignments' created_at) to the last committed event, on the coordinator's clock."""
    first, last = None, 0
    for device, counter in counters.items():
        committed = (
            "SELECT 1 FROM events WHERE device_id = ? AND counter = ? AND kind = 'committed'",
            [device, counter],
        )
        wait_for(lambda q=committed: rig.store_query(*q), 60, 0.1, what=f"{device}'s committed event")  # type: ignore[misc]
        row = rig.store_query(
            "SELECT a.created_at, e.received_at FROM assignments a JOIN events e ON e.device_id = a.device_id"
            " AND e.counter = a.counter AND e.kind = 'committed' WHERE a.device_id = ? AND a.counter = ?",
            [device, counter],
        )[0]
        first = row["created_at"] if first is None else min(first, row["created_at"])
        last = max(last, row["received_at"])
    assert first is not None
    return float(last - first) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--rate", type=float, default=4.0, help="inferences per device per second")
    parser.add_argument("--gate-tick", type=float, default=1.0, help="rollout_tick_seconds of the coordinator")
    args = parser.parse_args()
    n = args.devices
    timeout = 120 + n * 0.3
    with tempfile.TemporaryDirectory(prefix="fedfleet-rollback-") as tmp:
        root = Path(tmp)
        broker = Mosquitto(root / "mosquitto")
        rig = Rig(
            root,
            devices=n,
            mqtt_url=broker.url,
            rate=args.rate,
            window_seconds=1.0,
            rollout_tick_seconds=args.gate_tick,
        )
        try:
            t0 = time.monotonic()
            rig.setup()
            print(f"{n} devices on {RELEASES['base']} in {time.monotonic() - t0:.1f} s", flush=True)
            rig.cli("assign", "--fleet", rig.fleet_name, RELEASES["healthy"])
            _committed_all(rig, RELEASES["healthy"], n, timeout)

            issued = rig.cli("assign", "--fleet", rig.fleet_name, RELEASES["base"])["assignments"]
            _committed_all(rig, RELEASES["base"], n, timeout)
            bare = _bare_fanout(rig, {a["device"]: a["counter"] for a in issued})
            print(f"bare fan-out of {n} assignments (target in slot): {bare:.2f} s", flush=True)

            min_samples = max(500, 2 * n)
            rollout = rig.cli(
                "rollout",
                "start",
                RELEASES["scrambled"],
                "--fleet",
                rig.fleet_name,
                "--canary",
                str(n),
                "--waves",
                "1.0",
                "--bake",
                "0",
                "--min-samples",
                str(min_samples),
                "--silent-after",
                str(timeout),
            )["id"]
            rig.wait_phase(rollout, {"rolled_back", "completed"}, timeout)
            _report(n, bare, args.gate_tick, _measure(rig, rollout, min_samples))
        finally:
            rig.stop()
            broker.stop()


def _report(n: int, bare: float, gate_tick: float, verdict: dict[str, float]) -> None:
    target = gate_tick + 2 * bare
    result = {
        "benchmark": "rollback",
        "devices": n,
        "bare_fanout_seconds": round(bare, 3),
        "gate_tick_seconds": gate_tick,
        **{k: round(v, 3) for k, v in verdict.items()},
        "target_seconds": round(target, 3),
        "ratio_to_target": round(verdict["rollback_seconds"] / target, 3),
        "met": verdict["rollback_seconds"] <= target,
    }
    print(
        f"rollback of {n} devices: {verdict['rollback_seconds']:.2f} s from the breaking evidence "
        f"(decision after {verdict['decision_seconds']:.2f} s); target {target:.2f} s "
        f"(gate tick {gate_tick} + 2 x {bare:.2f})",
    )
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def _measure(rig: Rig, rollout: str, min_samples: int) -> dict[str, float]:
    scrambled, base = RELEASES["scrambled"], RELEASES["base"]
    committed = rig.store_query(
        "SELECT max(received_at) AS t FROM events e JOIN rollout_devices rd ON rd.device_id = e.device_id"
        " AND rd.counter = e.counter WHERE rd.rollout_id = ? AND e.kind = 'committed'",
        [rollout],
    )[0]["t"]
    cumulative, enough = 0, None
    for w in rig.store_query(
        "SELECT received_at, inferences FROM telemetry WHERE release_id = ? ORDER BY received_at", [scrambled]
    ):
        cumulative += w["inferences"]
        if cumulative >= min_samples:
            enough = w["received_at"]
            break
    if enough is None:
        raise SystemExit("the scrambled release never gathered min_samples: nothing to measure")
    decided = rig.store_query(
        "SELECT at FROM rollout_decisions WHERE rollout_id = ? AND decision = 'rollback'", [rollout]
    )[0]["at"]
    # The engine counts a device committed from its status, which can arrive before its committed event:
    # the evidence was complete no later than the decision.
    broke = min(max(committed, enough), decided)
    back = rig.store_query(
        "SELECT max(received_at) AS t FROM events e JOIN rollout_devices rd ON rd.device_id = e.device_id"
        " AND rd.rollback_counter = e.counter WHERE rd.rollout_id = ? AND e.kind = 'committed'"
        " AND e.release_id = ?",
        [rollout, base],
    )[0]["t"]
    return {"rollback_seconds": (back - broke) / 1000, "decision_seconds": (decided - broke) / 1000}


if __name__ == "__main__":
    main()
