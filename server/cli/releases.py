"""`fedfleet releases show` and `retire`: one release, and taking it out of the update repository once nothing
needs it."""

from __future__ import annotations

from typing import Annotated

import typer

from server.cli.common import DEFAULT_DATA_DIR, DataDirOption, JsonOption, local_time, out, print_json
from server.cli.remote import connect

__all__ = ["releases_retire", "releases_show"]


def releases_show(
    release_id: Annotated[str, typer.Argument(metavar="RELEASE", help="The release, name@version.")],
    card: Annotated[bool, typer.Option("--card", help="Print the model card in Markdown only.")] = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """One release: where it came from, its target (path, bytes, sha256), when it was published and retired, the
    devices running it, its rollouts and its model card."""
    with connect(data_dir) as fleet:
        doc = fleet.release(release_id)
    if as_json:
        print_json({k: v for k, v in doc.items() if k != "card_html"})
        return
    if not card:
        retired = f", retired {local_time(doc['retired_at'])}" if doc["retired_at"] else ""
        rollouts = ", ".join(f"{r['id']} ({r['phase']})" for r in doc["rollouts"]) or "none"
        out.print(
            f"{doc['id']} ({_source(doc['source'])}): published {local_time(doc['created_at'])}{retired}\n"
            f"  target {doc['target_path']}, {doc['bytes']} bytes, sha256 {doc['sha256']}\n"
            f"  running on {doc['devices_running']} device(s); rollouts: {rollouts}\n",
            markup=False,
        )
    out.print(doc["card_markdown"], markup=False)


def _source(source: dict[str, str | None]) -> str:
    """Where a release came from, in words: a file, or the model version it was trained as."""
    return f"trained as {source['model_version']}" if source.get("model_version") else str(source["kind"])


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
