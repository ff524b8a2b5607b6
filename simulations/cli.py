"""The `fedfleet` command: the coordinator's commands (server.cli) plus those that run simulated fleets on this
machine, which live here because `simulations` builds on `server` and never the other way round."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from server.cli import app
from server.cli import main as server_main
from server.cli_common import out

__all__ = ["app", "main"]


@app.command()
def simulate(
    scenario: Annotated[
        str, typer.Option(help="A scenario name (healthy, bad-release, cohort-drift, faults) or a .toml path.")
    ],
    devices: Annotated[int, typer.Option(min=4, help="Simulated devices.")] = 20,
    seed: Annotated[int, typer.Option(help="Seed for the devices' input streams.")] = 0,
    report: Annotated[Path | None, typer.Option(help="Directory for summary.md and the PNG plots.")] = None,
    keep: Annotated[Path | None, typer.Option(help="Keep the coordinator data and device state here.")] = None,
) -> None:
    """Rehearse a scenario on a simulated fleet of real agents: rollouts, faults, the outcome checked against
    what the scenario expects (exit 1 if not met), and a report."""
    from simulations.report import write_report
    from simulations.rig import Rig
    from simulations.scenario import ScenarioError, ScenarioResult, load_scenario, run_scenario

    try:
        plan = load_scenario(scenario)
    except ScenarioError as e:
        out.print(f"[red]{e}[/]")
        raise typer.Exit(1) from e
    out.print(f"[bold]{plan.name}[/]: {plan.description}")
    with tempfile.TemporaryDirectory(prefix="fedfleet-sim-") as tmp:
        root = keep or Path(tmp)

        def after(rig: Rig, result: ScenarioResult) -> None:
            if report is not None:
                write_report(plan, rig, result, report)

        result = run_scenario(plan, root, devices, seed, progress=lambda s: out.print(f"  {s}"), after=after)
    verdict = "[green]passed[/]" if result.passed else "[red]FAILED[/]: " + "; ".join(result.failures)
    out.print(f"{plan.name}: {verdict}; telemetry windows lost: {result.lost_windows}")
    if report:
        out.print(f"report: {report / 'summary.md'}")
    if not result.passed:
        raise typer.Exit(1)


def main() -> None:
    server_main()


if __name__ == "__main__":
    main()
