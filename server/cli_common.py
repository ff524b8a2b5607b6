"""What every `fedfleet` command module shares: the data-dir and --json options, output, small parsers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

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
]

out = Console(soft_wrap=True)  # never hard-wrap: output is often piped or grepped

DataDirOption = Annotated[
    Path,
    typer.Option("--data-dir", envvar=ENV_DATA_DIR, help="Coordinator data directory.", show_default=True),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document and nothing else.")]


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")


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
