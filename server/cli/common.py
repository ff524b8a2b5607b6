"""What every `fedfleet` command module shares: the data-dir and --json options, output, small parsers."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

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
    "open_datadir",
    "out",
    "parse_labels",
    "print_json",
    "print_rows",
]

out = Console(soft_wrap=True)  # never hard-wrap: output is often piped or grepped

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
