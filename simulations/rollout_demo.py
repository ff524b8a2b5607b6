"""Drift-gated rollouts on this machine: a coordinator (`fedfleet serve`, embedded broker), a fleet of real agents
inferring in one process, and two rollouts driven through the `fedfleet rollout` CLI:

1. a healthy update goes canary → 50% → 100%, each wave judged on the devices' telemetry;
2. a broken build (output classes scrambled: it installs and passes its own probe, as a bad build would) is
   stopped at the canary by the prediction gates and the canary devices, which had committed it, are reverted.

    python -m simulations.rollout_demo [--devices 20] [--out demo-out]

Prints each decision as the coordinator records it, then a summary, and leaves the coordinator's data in
OUT/data (try `fedfleet rollout status rollout-2 --data-dir OUT/data`).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from simulations.rig import RELEASES, Rig

console = Console(soft_wrap=True)

WAVES = ["--canary", "3", "--canary-by", "site", "--waves", "0.5,1.0", "--bake", "2", "--min-samples", "300"]


def _follow(rig: Rig, rollout_id: str, timeout: float) -> dict[str, Any]:
    """Print decisions as they are recorded until the rollout ends; return its final status."""
    shown = 0
    deadline = time.monotonic() + timeout
    while True:
        rows = rig.decisions(rollout_id)
        for r in rows[shown:]:
            wave = "canary" if r["wave"] == 0 else ("plan" if r["wave"] < 0 else f"wave {r['wave']}")
            colour = {"rollback": "red", "completed": "green", "rolled_back": "green"}.get(r["decision"], "cyan")
            console.print(f"  [{colour}]{r['decision']:>11}[/] {wave:>7}  {r['reason']}")
        shown = len(rows)
        phase = rig.phase(rollout_id)
        if phase in ("completed", "rolled_back", "aborted"):
            return rig.status(rollout_id)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{rollout_id} still {phase} after {timeout:.0f} s")
        time.sleep(0.3)


MARKER = ".fedfleet-rollout-demo"  # in every directory this demo made: the only kind it replaces


def run(devices: int, out: Path, timeout: float) -> list[dict[str, Any]]:
    if (out / MARKER).exists():
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} holds files this demo did not write; give another --out (it is replaced)")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    console.print(f"Starting a coordinator and {devices} agents (each its own state, MQTT session, gRPC channel)…")
    rig = Rig(out, devices=devices, fleet_name="demo")
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    try:
        rig.setup()
        console.print(f"{devices} devices run {RELEASES['base']} ({time.monotonic() - started:.1f} s)\n")
        for title, release in (("A healthy update", RELEASES["healthy"]), ("A broken build", RELEASES["scrambled"])):
            console.print(f"[bold]{title}:[/] fedfleet rollout start {release} {' '.join(WAVES)}")
            begun = time.monotonic()
            rollout_id = rig.cli("rollout", "start", release, "--fleet", rig.fleet_name, *WAVES)["id"]
            status = _follow(rig, rollout_id, timeout)
            fired = [
                f"{g['metric']} = {g['value']:.3g} ({g['op']} {g['threshold']:g})"
                for d in status["decisions"]
                if d["decision"] == "rollback"
                for g in d["gates"]
                if g["verdict"] == "fail"
            ]
            results.append(
                {
                    "rollout": rollout_id,
                    "release": release,
                    "outcome": status["phase"],
                    "seconds": time.monotonic() - begun,
                    "gate": "; ".join(fired) or "-",
                    "running": {r: rig.running(r) for r in RELEASES.values() if rig.running(r)},
                }
            )
            console.print()
        verified = rig.cli("audit", "verify")
    finally:
        rig.stop()
    table = Table("rollout", "release", "outcome", "gate that fired", "seconds", "devices now on")
    for r in results:
        running = ", ".join(f"{k} {v}" for k, v in r["running"].items())
        table.add_row(r["rollout"], r["release"], r["outcome"], r["gate"], f"{r['seconds']:.1f}", running)
    console.print(table)
    console.print(f"audit trail: {verified['entries']} entries, intact: {verified['intact']}")
    console.print(f"coordinator data: {rig.datadir.root}  (try: fedfleet rollout list --data-dir {rig.datadir.root})")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=20, help="simulated devices (default 20; at least 4)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("rollout-demo-out"),
        help="output directory (replaced, if an earlier run of this demo made it; never another)",
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds allowed per rollout")
    args = parser.parse_args()
    if args.devices < 4:
        parser.error("--devices must be at least 4 (a canary of one per site, and more waves)")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        results = run(args.devices, args.out, args.timeout)
    except (TimeoutError, AssertionError, FileExistsError) as e:
        console.print(f"[red]failed:[/] {e}")
        return 1
    expected = ["completed", "rolled_back"]
    return 0 if [r["outcome"] for r in results] == expected else 1


if __name__ == "__main__":
    sys.exit(main())
