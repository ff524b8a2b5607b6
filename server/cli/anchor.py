"""`fedfleet audit anchor`: sign the audit trail's head and export it, for `fedfleet audit verify --against`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from server.cli.common import DEFAULT_DATA_DIR, DataDirOption, JsonOption, open_datadir, out, print_json
from server.loop.retention import ANCHORS_DIR, export_anchor

__all__ = ["audit_anchor"]


def audit_anchor(
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help=f"Write the export here (default: DATA/{ANCHORS_DIR}/anchor-<seq>.json)."),
    ] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Sign the audit head (last sequence and hash) with the coordinator's audit key and export it. Keep the
    export off this machine: `audit verify --against EXPORT` later fails if the database was restored from an
    older copy or cut at its tail."""
    d = open_datadir(data_dir)
    with d.store() as store:
        doc, path = export_anchor(store, d.keys, d.root / ANCHORS_DIR, out_file)
    if as_json:
        print_json({**doc, "path": str(path)})
    else:
        out.print(f"Anchored the audit trail at entry {doc['seq']} ({doc['hash'][:12]}): {path}")
