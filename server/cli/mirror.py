"""`fedfleet mirror sync DEST`: publish the update repository to a static mirror directory (server/trust/mirror.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from server.cli.common import DEFAULT_DATA_DIR, DataDirOption, JsonOption, open_datadir, out, print_json
from server.trust.mirror import sync_mirror

__all__ = ["mirror_app"]

mirror_app = typer.Typer(
    help="Mirrors: publish the signed update repository to a directory any static HTTP(S) server serves.",
    no_args_is_help=True,
)


@mirror_app.command("sync")
def mirror_sync(
    dest: Annotated[Path, typer.Argument(help="The mirror's root directory (created if missing).")],
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Write the TUF metadata (consistent snapshots) and targets to DEST, atomically and idempotently: new files
    first, timestamp.json last, and what the repository dropped only afterwards. Serve DEST at an https:// URL
    and list it in agents' `mirrors`; agents verify everything they fetch there. Files are written readable by
    their owner only: let the web server's user read them (same user, or a group and chmod). `fedfleet serve`
    re-syncs the directories in the mirror_dirs setting on every new timestamp."""
    result = sync_mirror(open_datadir(data_dir).repository(), dest)
    if as_json:
        print_json(
            {
                "destination": result.destination,
                "timestamp_version": result.timestamp_version,
                "written": result.written,
                "deleted": result.deleted,
                "unchanged": result.unchanged,
            }
        )
        return
    out.print(
        f"mirror {dest} at timestamp version {result.timestamp_version}: {len(result.written)} file(s) written, "
        f"{len(result.deleted)} deleted, {result.unchanged} unchanged",
        highlight=False,
    )
