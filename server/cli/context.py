"""`fedfleet context …`: named coordinators to run the CLI against, kept in ~/.config/fedfleet/config.toml.

    current = "prod"
    [contexts.prod]
    server = "https://coordinator.example:8080"
    token_file = "/home/me/.config/fedfleet/prod.token"
    ca = "/home/me/.config/fedfleet/prod-ca.pem"

A context names the token's file, never the token. Where a command runs is decided by `target()`, once for every
command: `--server URL` (or FEDFLEET_SERVER) first, then `--context NAME` (or FEDFLEET_CONTEXT), then the current
context unless the command was given a data directory (--data-dir or FEDFLEET_DATA_DIR), else locally.
"""

from __future__ import annotations

import json
import os
import tomllib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from edge_agent.contract.addresses import is_loopback
from edge_agent.contract.files import atomic_write_bytes
from server.cli.common import JsonOption, out, print_json, print_rows
from server.errors import CoordinatorError

__all__ = [
    "ENV_CA",
    "ENV_CONTEXT",
    "ENV_SERVER",
    "ENV_TOKEN",
    "RemoteTarget",
    "config_path",
    "context_app",
    "target",
]

ENV_SERVER, ENV_TOKEN, ENV_CONTEXT, ENV_CA = "FEDFLEET_SERVER", "FEDFLEET_TOKEN", "FEDFLEET_CONTEXT", "FEDFLEET_CA"

context_app = typer.Typer(
    help="Named coordinators (server URL, token file, CA) to run fedfleet against from anywhere, like kubectl's.",
    no_args_is_help=True,
)


@dataclass(frozen=True)
class RemoteTarget:
    server: str  # https://host:port (http:// only to loopback)
    token: str
    ca: Path | None  # the fleet CA's certificate (DATA/trust/ca.pem); None: the system's trust store


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fedfleet" / "config.toml"


def _load() -> dict[str, Any]:
    path = config_path()
    if not path.is_file():
        return {"contexts": {}}
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CoordinatorError(f"{path} is not readable TOML ({e}); fix or remove it") from e
    if not isinstance(doc.get("contexts", {}), dict):
        raise CoordinatorError(f"{path}: contexts must be a table of [contexts.NAME] tables")
    doc.setdefault("contexts", {})
    return doc


def _save(doc: dict[str, Any]) -> None:
    lines = []
    if doc.get("current"):
        lines.append(f"current = {json.dumps(doc['current'])}")
    for name, ctx in sorted(doc["contexts"].items()):
        lines.append(f"\n[contexts.{json.dumps(name)}]")
        lines += [f"{key} = {json.dumps(str(value))}" for key, value in ctx.items() if value]
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def check_server_url(url: str) -> str:
    """The URL without a trailing slash; refused unless https://, or http:// to this machine (loopback)."""
    shape = f"server {url!r} must be a URL like https://coordinator.example:8080"
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        _ = parts.port  # a port that is not a number raises here
    except ValueError:
        raise CoordinatorError(shape) from None
    if parts.scheme not in ("http", "https") or not host:
        raise CoordinatorError(shape)
    if parts.scheme == "http" and not is_loopback(host):
        raise CoordinatorError(
            f"plaintext http:// is only for a coordinator on this machine; use https://{parts.netloc} with --ca the "
            "fleet CA's certificate"
        )
    return url.rstrip("/")


def _read_token(path: Path) -> str:
    try:
        token = path.expanduser().read_text().strip()
    except OSError as e:
        raise CoordinatorError(f"cannot read the token file {path} ({e.strerror})") from e
    if not token:
        raise CoordinatorError(f"the token file {path} is empty")
    return token


def _ca(path: str | Path | None) -> Path | None:
    if not path:
        return None
    ca = Path(path).expanduser()
    if not ca.is_file():
        raise CoordinatorError(f"the CA certificate {ca} does not exist; give the fleet CA's ca.pem")
    return ca


def target() -> RemoteTarget | None:
    """Where the running command goes: a remote coordinator, or None for the local data directory. Reads the
    global options (`fedfleet --server URL --token-file F --ca CA` or `--context NAME`, and their variables)."""
    ctx = click.get_current_context()
    root = ctx.find_root().params
    server, context = root.get("server"), root.get("context")
    env_token = os.environ.get(ENV_TOKEN, "").strip()
    if server:
        token_file = root.get("token_file")
        token = env_token or (_read_token(Path(token_file)) if token_file else "")
        if not token:
            raise CoordinatorError(f"--server needs a token: --token-file FILE or {ENV_TOKEN}")
        return RemoteTarget(check_server_url(str(server)), token, _ca(root.get("ca")))
    doc = _load()
    if not context:
        data_dir_given = "data_dir" in ctx.params and ctx.get_parameter_source("data_dir") in (
            click.core.ParameterSource.COMMANDLINE,
            click.core.ParameterSource.ENVIRONMENT,
        )
        if data_dir_given or not doc.get("current"):
            return None
        context = doc["current"]
    entry = doc["contexts"].get(context)
    if not isinstance(entry, dict):
        raise CoordinatorError(f"no context {context!r} in {config_path()}; `fedfleet context list` shows them")
    token = env_token or _read_token(Path(str(entry.get("token_file", ""))))
    return RemoteTarget(check_server_url(str(entry.get("server", ""))), token, _ca(root.get("ca") or entry.get("ca")))


@context_app.command("add")
def context_add(
    name: Annotated[str, typer.Argument(help="A name for this coordinator, e.g. prod.")],
    server: Annotated[str, typer.Option(help="The coordinator's dashboard URL, https://host:port.")],
    token_file: Annotated[Path, typer.Option(help="A file holding your token (`fedfleet users add` printed it).")],
    ca: Annotated[
        Path | None, typer.Option(help="The fleet CA's certificate (the coordinator's DATA/trust/ca.pem).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Add or replace a named coordinator; the first one added becomes the current one."""
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise CoordinatorError(f"context name {name!r} must be letters, digits, '-', '_' or '.'")
    url = check_server_url(server)
    _read_token(token_file)
    entry = {"server": url, "token_file": str(token_file.expanduser().resolve())}
    ca_file = _ca(ca)
    if ca_file is not None:
        entry["ca"] = str(ca_file.resolve())
    doc = _load()
    doc["contexts"][name] = entry
    doc.setdefault("current", name)
    _save(doc)
    if as_json:
        print_json({"name": name, **entry, "current": doc["current"] == name})
    else:
        out.print(f"Context [bold]{name}[/]: {url}" + (" (current)" if doc["current"] == name else "") + ".")


@context_app.command("use")
def context_use(name: Annotated[str, typer.Argument(help="A context from `fedfleet context list`.")]) -> None:
    """Make a context the current one: commands without --data-dir or --server go to its coordinator."""
    doc = _load()
    if name not in doc["contexts"]:
        raise CoordinatorError(f"no context {name!r} in {config_path()}; `fedfleet context add` adds one")
    doc["current"] = name
    _save(doc)
    out.print(f"Current context: [bold]{name}[/] ({doc['contexts'][name]['server']}).")


@context_app.command("list")
def context_list(as_json: JsonOption = False) -> None:
    """Every named coordinator; the current one is marked."""
    doc = _load()
    rows = [
        {
            "name": n,
            "server": c.get("server"),
            "token_file": c.get("token_file"),
            "ca": c.get("ca"),
            "current": doc.get("current") == n,
        }
        for n, c in sorted(doc["contexts"].items())
    ]
    print_rows(
        rows,
        as_json,
        ["", "context", "server", "token file", "CA"],
        lambda r: ["*" if r["current"] else "", r["name"], r["server"], r["token_file"], r["ca"] or "-"],
        f"No contexts in {config_path()}; `fedfleet context add NAME --server URL --token-file F` adds one.",
    )
