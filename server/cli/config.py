"""`fedfleet config`: read and change the coordinator's settings (DATA/config.toml) without editing TOML."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import typer

from server import audit
from server.cli.common import DEFAULT_DATA_DIR, DataDirOption, JsonOption, open_datadir, out, print_json

__all__ = ["config_app"]

config_app = typer.Typer(
    help="The coordinator's settings in DATA/config.toml (`fedfleet serve` flags override them).",
    no_args_is_help=True,
)


@config_app.command("show")
def config_show(data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False) -> None:
    """Print every setting and its value."""
    settings = dataclasses.asdict(open_datadir(data_dir).config())
    if as_json:
        print_json(settings)
        return
    for key, value in settings.items():
        out.print(f"{key} = {json.dumps(list(value) if isinstance(value, tuple) else value)}", highlight=False)


@config_app.command("set")
def config_set(
    key: Annotated[str, typer.Argument(help="A setting, as `fedfleet config show` names it.")],
    value: Annotated[str, typer.Argument(help="true/false, a number, text, or for tls_hosts a comma-separated list.")],
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
) -> None:
    """Change one setting (checked first: a bad key or value changes nothing). A running serve reads its settings
    when it starts: restart it to apply the change."""
    d = open_datadir(data_dir)
    changed = d.set_config(key, value)
    new = getattr(changed, key)
    with d.store() as store:
        audit.append(store, "config.set", key, {"value": list(new) if isinstance(new, tuple) else new}, actor="cli")
    out.print(f"{key} = {json.dumps(list(new) if isinstance(new, tuple) else new)}", highlight=False)
