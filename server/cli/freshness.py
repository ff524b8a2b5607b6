"""`fedfleet devices behind`: the devices that are stale or lag their assignment past the freshness bound."""

from __future__ import annotations

from typing import Annotated

import typer

from server.cli.common import DEFAULT_DATA_DIR, DataDirOption, JsonOption, open_datadir, print_rows
from server.errors import CoordinatorError
from server.store import now_ms
from server.store.freshness import FreshnessRecords

__all__ = ["devices_behind"]


def devices_behind(
    fleet: Annotated[str | None, typer.Option(help="Only this fleet.")] = None,
    after: Annotated[
        float | None,
        typer.Option(help="Lagging: assigned over this many seconds ago. [default: config.toml's freshness_hours]"),
    ] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Devices behind: stale (they hold no unexpired freshness statement, so a newer assignment may be withheld
    from them) or lagging (running another release than assigned, for longer than the freshness bound)."""
    d = open_datadir(data_dir)
    if after is not None and not after >= 0:
        raise CoordinatorError("--after must be a number of seconds, 0 or more")
    bound_ms = int((after if after is not None else d.config().freshness_hours * 3600) * 1000)
    with d.store() as store:
        rows = FreshnessRecords(store).behind(now_ms() - bound_ms, fleet)
    print_rows(
        rows,
        as_json,
        ["device", "fleet", "stale", "lagging", "assigned", "running", "online", "last event"],
        lambda r: [
            r["device_id"],
            r["fleet"],
            "yes" if r["stale"] else "no",
            "yes" if r["lagging"] else "no",
            f"{r['assigned_release'] or '-'} ({r['assigned_counter']})",
            r["running_release"] or "-",
            "yes" if r["online"] else "no",
            r["last_event"] or "-",
        ],
        "No device is behind: every one is fresh and runs what it was assigned.",
    )
