"""What every `fedfleet` command module shares: the data-dir and --json options, output, small parsers."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table

from server.datadir import DEFAULT_DATA_DIR, ENV_DATA_DIR, DataDir
from server.errors import CoordinatorError

__all__ = [
    "DEFAULT_DATA_DIR",
    "DataDirOption",
    "JsonOption",
    "fmt",
    "local_time",
    "open_datadir",
    "out",
    "parse_labels",
    "print_json",
    "print_rows",
    "progress",
]

# Never hard-wrap, and never cut a table to 80 columns when the output is piped or grepped: a terminal's width
# only applies to a terminal.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 10_000)

DataDirOption = Annotated[
    Path,
    typer.Option("--data-dir", envvar=ENV_DATA_DIR, help="Coordinator data directory.", show_default=True),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document and nothing else.")]


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")


def print_rows(
    rows: list[dict[str, Any]],
    as_json: bool,
    columns: list[str],
    cells: Callable[[dict[str, Any]], list[str]],
    empty: str,
) -> None:
    """A listing: one JSON document with --json, else a table of `columns` (or `empty` when there are no rows)."""
    if as_json:
        print_json(rows)
        return
    table = Table(*columns)
    for r in rows:
        table.add_row(*cells(r))
    out.print(table if rows else empty)


def open_datadir(data_dir: Path) -> DataDir:
    """The coordinator's data directory, for a command that works on the coordinator's host only. Refused with
    --server or --context: such a command never quietly acts on a local directory instead of the coordinator named."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and (ctx.find_root().params.get("server") or ctx.find_root().params.get("context")):
        names: list[str] = []
        c = ctx
        while c.parent is not None:  # the command's own words, without however the program was started
            names.insert(0, c.info_name or "")
            c = c.parent
        raise CoordinatorError(
            f"`fedfleet {' '.join(names)}` works on the coordinator's host only (it reads the data directory, not "
            "the API): run it there, without --server or --context"
        )
    return DataDir(data_dir).require()


def parse_labels(items: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CoordinatorError(f"label {item!r} must look like key=value")
        labels[key] = value
    return labels


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def local_time(epoch_ms: int | float | None) -> str:
    """Epoch milliseconds as a local ISO-8601 time to the second (2026-12-05T03:04:05+01:00); '-' for none."""
    if epoch_ms is None:
        return "-"
    return dt.datetime.fromtimestamp(epoch_ms / 1000).astimezone().isoformat(timespec="seconds")


def progress(message: str) -> None:
    """A line saying what a slow step is doing, on stderr so that --json output stays one document."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
