"""`fedfleet releases retire`: take a release out of the update repository once nothing needs it."""

from __future__ import annotations

from typing import Annotated

import typer

from server.cli.common import DEFAULT_DATA_DIR, DataDirOption, JsonOption, out, print_json
from server.cli.remote import connect

__all__ = ["releases_retire"]


def releases_retire(
    release_id: Annotated[str, typer.Argument(metavar="RELEASE", help="The release, name@version.")],
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Retire a release: targets and snapshot no longer name it (new versions, signed as usual), its bytes are
    deleted, the store marks it retired and the audit records it. Refused while a device runs or is assigned it,
    or while a live rollout rolls it out or could roll devices back to it."""
    with connect(data_dir) as fleet:
        result = fleet.release_retire(release_id)
    if as_json:
        print_json(result)
    else:
        out.print(f"Retired {release_id}: {len(result['deleted'])} file(s) deleted from the update repository.")
