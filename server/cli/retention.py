"""`fedfleet retention run`: what the policy's `[retention]` lets go, shown (--dry-run) or pruned now."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.table import Table

from server.cli.common import DEFAULT_DATA_DIR, DataDirOption, JsonOption, open_datadir, out, print_json
from server.loop.retention import prune

__all__ = ["retention_app"]

retention_app = typer.Typer(
    help="Retention: prune old telemetry windows, update events and training incidents as the policy says.",
    no_args_is_help=True,
)


@retention_app.command("run")
def retention_run(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would go; change nothing.")] = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Prune now, in small batches (as `fedfleet serve` does every retention.interval_seconds of the policy); the
    audit records the counts. Never pruned: the audit trail, the privacy ledger, what live rollouts and running
    trainings read."""
    d = open_datadir(data_dir)
    policy = d.policy()
    with d.store() as store:
        report = prune(store, policy.retention, dry_run=dry_run, actor="cli")
    if as_json:
        print_json(report.as_dict())
        return
    table = Table("table", "kept for", "older than", "would go" if dry_run else "deleted")
    days = {
        "telemetry": policy.retention.telemetry_days,
        "events": policy.retention.events_days,
        "fl_incidents": policy.retention.incidents_days,
    }
    for name, kept in days.items():
        if name in report.cutoffs:
            table.add_row(
                name,
                f"{kept:g} days",
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report.cutoffs[name] / 1000)),
                str(report.counts[name]),
            )
        else:
            table.add_row(name, "forever", "-", "0")
    out.print(table)
    if report.protected_releases:
        out.print(f"Kept for live rollouts: telemetry and events of {', '.join(report.protected_releases)}.")
    if not dry_run and report.audit_seq is not None:
        out.print(f"Audited as entry {report.audit_seq}.")
