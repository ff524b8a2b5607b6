"""`fedfleet simulate` and `fedfleet demo`: the commands that run simulated fleets on this machine. They join the
coordinator's `fedfleet` (server.cli) through the entry-point group `fedfleet.commands` (see pyproject.toml), so
`simulations` builds on `server` and never the other way round."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from server.cli import main as server_main
from server.cli.common import out
from simulations.workload import SensorFault

__all__ = ["main", "register"]


def simulate(
    scenario: Annotated[
        str,
        typer.Option(help="A scenario name (healthy, bad-release, cohort-drift, faults, closed-loop) or a .toml path."),
    ],
    devices: Annotated[int, typer.Option(min=4, help="Simulated devices (each a real agent).")] = 100,
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
    if plan.kind == "closed-loop":
        _run_loop_scenario(plan.loop, devices, None, seed, report or Path("demo-out/report"), keep)
        return
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


def demo(
    devices: Annotated[int, typer.Option(min=4, max=200, help="Simulated devices (each a real agent).")] = 10,
    rounds: Annotated[
        int | None, typer.Option(min=1, max=50, help="Federated rounds per training (default: the scenario's, 20).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the data split, training and input streams.")] = 0,
    report: Annotated[Path, typer.Option(help="Directory for summary.md and the PNG plots.")] = Path("demo-out/report"),
    keep: Annotated[Path | None, typer.Option(help="Keep the coordinator data and device state here.")] = None,
    webhooks: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="A TOML file of alerts.webhooks tables (url, secret) added to the demo's policy: alerts go there.",
        ),
    ] = None,
    crash_at: Annotated[
        list[str] | None,
        typer.Option(
            help="Kill the coordinator (SIGKILL) at this crash point of the loop, e.g. loop.training:running, and "
            "restart it; repeat for more, in order. The loop must still close, once."
        ),
    ] = None,
) -> None:
    """The whole loop on this machine: train with Flower + Opacus on a simulated fleet, release, install; the
    fleet's sensors drift, the drift alarm fires, the policy says retrain, the fleet retrains on its fresh data
    within its privacy budget, and the new model goes out in gated waves until drift is back below threshold.
    Exit 1 if any of that did not happen. The settings are simulations/scenarios/closed-loop.toml's."""
    from simulations.scenario import load_scenario

    hooks = webhooks.read_text() if webhooks is not None else ""
    _run_loop_scenario(load_scenario("closed-loop").loop, devices, rounds, seed, report, keep, hooks, crash_at or [])


def _run_loop_scenario(
    loop: dict[str, Any],
    devices: int,
    rounds: int | None,
    seed: int,
    report: Path,
    keep: Path | None,
    webhooks: str = "",
    crash_points: list[str] | None = None,
) -> None:
    fault = SensorFault(str(loop.get("fault", "contrast")), float(loop.get("strength", 0.5)))
    rounds = rounds or int(loop.get("rounds", 3))
    threshold = float(loop.get("threshold", 0.25))
    _closed_loop(devices, rounds, seed, report, keep, fault, threshold, webhooks, crash_points or [])


def _closed_loop(
    devices: int,
    rounds: int,
    seed: int,
    report: Path,
    keep: Path | None,
    fault: SensorFault,
    threshold: float,
    webhooks: str,
    crash_points: list[str],
) -> None:
    import time

    from simulations.closed_loop import ClosedLoopRig, run_closed_loop, verdict
    from simulations.report import write_loop_report

    started = time.monotonic()
    out.print(f"[bold]closed loop[/]: {devices} devices, {rounds} rounds per training (a few minutes on 2 cores)")
    holder: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="fedfleet-demo-") as tmp:
        root = keep or Path(tmp)

        def after(rig: ClosedLoopRig) -> None:
            failures = verdict(rig.result)
            holder["failures"] = failures
            write_loop_report(rig.result, rig, report, not failures, failures)

        result = run_closed_loop(
            root,
            devices=devices,
            rounds=rounds,
            seed=seed,
            fault=fault,
            threshold=threshold,
            progress=lambda s: out.print(f"[{time.monotonic() - started:6.1f} s] {s}", markup=False),
            after=after,
            webhooks=webhooks,
            crash_points=crash_points,
        )
    failures = holder.get("failures", verdict(result))
    if failures:
        out.print("[red]the loop did not close[/]: " + "; ".join(failures))
        raise typer.Exit(1)
    out.print(f"[green]the loop closed[/] in {time.monotonic() - started:.0f} s; report: {report / 'summary.md'}")


def register(app: typer.Typer) -> None:
    """The `fedfleet.commands` entry point: add these commands to the coordinator's `fedfleet`."""
    app.command()(simulate)
    app.command()(demo)


def main() -> None:
    server_main()


if __name__ == "__main__":
    main()
