"""`fedfleet rollout …` and `fedfleet audit …`: thin commands over `server.rollout.driver` and `server.audit`.

A rollout is stored by these commands and driven by a running `fedfleet serve`; operator actions (pause, resume,
abort, rollback) change the stored state with the same authority as the engine, and the next tick acts on them.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from server import audit
from server.cli.common import (
    DEFAULT_DATA_DIR,
    DataDirOption,
    JsonOption,
    local_time,
    open_datadir,
    out,
    parse_labels,
    print_json,
)
from server.cli.remote import connect, is_remote
from server.errors import CoordinatorError
from server.rollout.engine import ACTIVE, Phase
from server.rollout.spec import OnFail, load_spec, parse_gate

__all__ = ["audit_app", "rollout_app"]

rollout_app = typer.Typer(
    help="Rollouts: drift-gated waves with automatic rollback. `fedfleet serve` drives them.", no_args_is_help=True
)
audit_app = typer.Typer(help="The hash-chained audit trail: list and verify.", no_args_is_help=True)

FollowOption = Annotated[
    bool, typer.Option("--follow", help="Follow the rollout live until it ends (Ctrl-C stops following, not it).")
]


@rollout_app.command("start")
def rollout_start(
    release: Annotated[str | None, typer.Argument(metavar="[RELEASE]", help="name@version (or in --spec).")] = None,
    spec_file: Annotated[Path | None, typer.Option("--spec", help="Rollout spec TOML; flags override it.")] = None,
    fleet: Annotated[str | None, typer.Option(help="Only devices of this fleet.")] = None,
    label: Annotated[list[str] | None, typer.Option(help="Label selector k=v; repeat for more.")] = None,
    canary: Annotated[int | None, typer.Option(help="Devices in the canary wave. [default: 1]")] = None,
    canary_by: Annotated[
        str | None, typer.Option(help="A label (e.g. site): the canary holds a device of each of its values.")
    ] = None,
    cohort_by: Annotated[
        str | None, typer.Option(help="A label whose every value is judged on its own too. [default: --canary-by]")
    ] = None,
    waves: Annotated[
        str | None, typer.Option(help="Cumulative fractions after the canary. [default: 0.1,0.5,1.0]")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for the canary choice and wave order. [default: 0]")] = None,
    bake: Annotated[float | None, typer.Option(help="Seconds each wave runs before its gates. [default: 300]")] = None,
    silent_after: Annotated[
        float | None, typer.Option(help="Seconds after its assignment a device may stay silent. [default: 600]")
    ] = None,
    on_fail: Annotated[OnFail | None, typer.Option(help="What a failing gate does. [default: rollback]")] = None,
    gate: Annotated[
        list[str] | None, typer.Option(help="A gate METRIC<=NUMBER (also <, >=, >); repeat; replaces the defaults.")
    ] = None,
    min_samples: Annotated[
        int | None, typer.Option(help="Inferences needed before a telemetry verdict. [default: 500]")
    ] = None,
    gate_window: Annotated[
        float | None, typer.Option(help="Judge only the latest N seconds of telemetry. [default: the whole wave]")
    ] = None,
    min_devices: Annotated[
        int | None, typer.Option(help="Devices reporting needed before a telemetry verdict. [default: 1]")
    ] = None,
    follow: FollowOption = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Start a rollout of a release in waves; refused (naming every reason) if the policy or another rollout forbids
    it. Gate metrics: input_max_psi, input_mean_psi, input_max_kl, score_psi, class_mix_shift, latency_p95_ratio,
    error_rate, failure_rate, silent_fraction."""
    fractions = None
    if waves is not None:
        try:
            fractions = [float(w) for w in waves.split(",")]
        except ValueError as e:
            raise CoordinatorError(f"--waves {waves!r} must be comma-separated fractions like 0.1,0.5,1.0") from e
    spec = load_spec(
        spec_file,
        release=release,
        fleet=fleet,
        selector=parse_labels(label) if label else None,
        canary=canary,
        canary_by=canary_by,
        cohort_by=cohort_by,
        waves=fractions,
        seed=seed,
        bake_seconds=bake,
        silent_after_seconds=silent_after,
        on_fail=str(on_fail) if on_fail else None,
        gates=[str(parse_gate(g)) for g in gate] if gate else None,
        min_samples=min_samples,
        min_devices=min_devices,
        gate_window_seconds=gate_window,
    )
    with connect(data_dir) as coordinator:
        status = coordinator.rollout_start(spec)
    rollout_id = status["id"]
    if as_json and not follow:
        print_json(status)
        return
    if follow and as_json:
        _follow(data_dir, rollout_id, as_json)
        return
    sizes = [sum(w["devices"].values()) for w in status["waves"]]
    out.print(f"Started [bold]{rollout_id}[/]: {spec.release} to {sum(sizes)} device(s) in waves of {sizes}.")
    if follow:
        _follow(data_dir, rollout_id, as_json)


@rollout_app.command("status")
def rollout_status(
    rollout_id: Annotated[str, typer.Argument(metavar="ROLLOUT")],
    follow: FollowOption = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Each wave with its devices by state, gate values against thresholds, and every decision with its reason."""
    if follow:
        _follow(data_dir, rollout_id, as_json)
        return
    status = _status(data_dir, rollout_id)
    if as_json:
        print_json(status)
    else:
        out.print(_render(status))


def _status(data_dir: Path, rollout_id: str) -> dict[str, Any]:
    with connect(data_dir) as fleet:
        return fleet.rollout_status(rollout_id)


def _follow(data_dir: Path, rollout_id: str, as_json: bool) -> None:
    """Redraw the status each second until the rollout ends; with --json, print only the final document."""
    status = _status(data_dir, rollout_id)
    with contextlib.suppress(KeyboardInterrupt):
        if as_json:
            while Phase(status["phase"]) in ACTIVE:
                time.sleep(1.0)
                status = _status(data_dir, rollout_id)
        else:
            with Live(_render(status), console=out, refresh_per_second=2) as live:
                while Phase(status["phase"]) in ACTIVE:
                    time.sleep(1.0)
                    status = _status(data_dir, rollout_id)
                    live.update(_render(status))
    if as_json:
        print_json(status)


def _render(status: dict[str, Any]) -> Group:
    """The status as a person reads it: a header, the waves, the gates (the last verdict's once the rollout is no
    longer judged), the decisions. Waves are named by `wave_label`: the canary, then wave 1 … N."""
    header = f"[bold]{status['id']}[/] {status['release']}: [bold]{status['phase']}[/], {status['wave_label']}"
    if status["bake_remaining_s"] is not None:
        header += f", {status['bake_remaining_s']:.0f} s of baking left"
    waves = Table("wave", "devices by state", title="waves", title_justify="left")
    for w in status["waves"]:
        mark = " ◀" if w["wave"] == status["wave"] else ""
        waves.add_row(w["name"] + mark, ", ".join(f"{k} {v}" for k, v in w["devices"].items()))
    judged_at = status["gates_at_ms"]
    title = "gates (now)" if judged_at is None else f"gates (last verdict, {local_time(judged_at)})"
    gates = Table("gate", "value", "threshold", "verdict", "note", title=title, title_justify="left")
    for g in status["gates"]:
        value = "-" if g["value"] is None else f"{g['value']:.4g}"
        style = {"fail": "red", "pass": "green"}.get(g["verdict"], "yellow")
        gates.add_row(g["metric"], value, f"{g['op']} {g['threshold']:g}", f"[{style}]{g['verdict']}[/]", g["note"])
    decisions = Table("time", "wave", "decision", "reason", title="decisions", title_justify="left")
    for dec in status["decisions"][-12:]:
        decisions.add_row(local_time(dec["at"]), dec["wave_label"], dec["decision"], dec["reason"])
    parts: list[Any] = [header, waves]
    if status["gates"]:
        parts.append(gates)
    parts.append(decisions)
    return Group(*parts)


def _act(action: str, rollout_id: str, data_dir: Path, as_json: bool) -> None:
    with connect(data_dir) as fleet:
        step = fleet.rollout_act(rollout_id, action)
    if as_json:
        print_json({"rollout": rollout_id, "phase": step["phase"], "decision": step["decision"]})
    else:
        out.print(f"{rollout_id}: {step['reason']}; now {step['phase']}.")


RolloutArg = Annotated[str, typer.Argument(metavar="ROLLOUT")]


@rollout_app.command("pause")
def rollout_pause(
    rollout_id: RolloutArg, data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False
) -> None:
    """Stop advancing: no new wave, no verdicts, until resumed. Devices keep their assignments."""
    _act("pause", rollout_id, data_dir, as_json)


@rollout_app.command("resume")
def rollout_resume(
    rollout_id: RolloutArg, data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False
) -> None:
    """Continue a paused rollout where it stopped (its gates are judged again)."""
    _act("resume", rollout_id, data_dir, as_json)


@rollout_app.command("abort")
def rollout_abort(
    rollout_id: RolloutArg, data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False
) -> None:
    """End the rollout now; devices keep what they were assigned (use rollback to revert them)."""
    _act("abort", rollout_id, data_dir, as_json)


@rollout_app.command("rollback")
def rollout_rollback(
    rollout_id: RolloutArg, data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False
) -> None:
    """Revert every device that received the release to its previous release (new, higher-counter assignments)."""
    _act("rollback", rollout_id, data_dir, as_json)


@rollout_app.command("list")
def rollout_list(data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False) -> None:
    """Every rollout with its release, phase and wave."""
    with connect(data_dir) as fleet:
        rows = fleet.rollouts()
    if as_json:
        print_json(rows)
        return
    table = Table("rollout", "release", "phase", "wave", "started")
    for r in rows:
        table.add_row(r["id"], r["release"], r["phase"], r["wave_label"], local_time(r["created_at"]))
    out.print(table)


@audit_app.command("list")
def audit_list(
    limit: Annotated[int, typer.Option(min=1, help="How many entries, newest first.")] = 50,
    action: Annotated[str | None, typer.Option(help="Only this action, e.g. rollout.rollback.")] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Audit entries, newest first: releases, assignment batches, rollout decisions, policy refusals, keys, devices."""
    with connect(data_dir) as fleet:
        rows = fleet.audit_entries(limit, action)
    if as_json:
        print_json(rows)
        return
    table = Table("seq", "time", "actor", "action", "subject", "hash")
    for r in rows:
        table.add_row(str(r["seq"]), local_time(r["at"]), r["actor"], r["action"], r["subject"], r["hash"][:12])
    out.print(table)


@audit_app.command("verify")
def audit_verify(
    against: Annotated[
        Path | None,
        typer.Option("--against", help="Also check the trail reaches this export of `audit anchor` (signed head)."),
    ] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Check the hash chain; names every edited or deleted entry. Exit 1 if the trail was tampered with. With
    --against, also exit 1 when the database is behind the export (restored from an older copy, cut at its tail),
    holds another entry at its sequence, or the export's signature is not this coordinator's."""
    if against is not None:
        if is_remote():
            raise CoordinatorError("--against reads the coordinator's keys: run it on the coordinator's host")
        d = open_datadir(data_dir)
        with d.store() as store:
            audit.check_anchor(store, audit.read_anchor(against), audit.anchor_public_key(d.keys))
    with connect(data_dir) as fleet:
        report = fleet.audit_verify()
    if as_json:
        print_json(report)
    elif report["intact"]:
        out.print(f"Audit trail intact: {report['entries']} entries, every hash and link checks.")
    if not report["intact"]:
        if not as_json:
            for p in report["problems"]:
                out.print(f"[red]entry {p['seq']}: {p['problem']}[/]")
        raise typer.Exit(1)
