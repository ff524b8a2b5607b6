"""`fedfleet users …`: people who use the coordinator's API and dashboard, their roles and tokens.

A token is printed once, when it is issued (add, rotate); the coordinator keeps only its hash. Runs on the
coordinator's host or, with an admin's token, from anywhere (`fedfleet --server URL users …`).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from server.cli.common import DEFAULT_DATA_DIR, DataDirOption, JsonOption, out, print_json, print_rows
from server.cli.remote import connect
from server.roles import Role

__all__ = ["users_app"]

users_app = typer.Typer(
    help="Users: people with a role (viewer, operator, release-manager, privacy-officer, admin) and a token.",
    no_args_is_help=True,
)


def _when(ms: int | None) -> str:
    return "-" if ms is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The user's name.")]


def _issued(doc: dict[str, Any], as_json: bool, what: str) -> None:
    if as_json:
        print_json(doc)
        return
    out.print(f"{what} [bold]{doc['name']}[/] ({doc['role']}). Their token, shown only now:", highlight=False)
    out.print(doc["token"], markup=False, highlight=False)


@users_app.command("add")
def users_add(
    name: NameArg,
    role: Annotated[Role, typer.Option(help="What they may do (server/roles.py lists each role's permissions).")],
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Add a user with a role; prints their token once (only its hash is kept). Audited."""
    with connect(data_dir) as fleet:
        doc = fleet.user_add(name, str(role))
    _issued(doc, as_json, "Added")


@users_app.command("list")
def users_list(data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False) -> None:
    """Every user with their role, when their token was issued, and whether they are revoked. Never a token."""
    with connect(data_dir) as fleet:
        rows = fleet.users()
    print_rows(
        rows,
        as_json,
        ["user", "role", "created", "token issued", "revoked"],
        lambda r: [
            r["name"],
            r["role"],
            _when(r["created_at"]),
            _when(r["rotated_at"]),
            _when(r["revoked_at"]),
        ],
        "No users yet: `fedfleet users add NAME --role viewer` adds one.",
    )


@users_app.command("rotate")
def users_rotate(name: NameArg, data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False) -> None:
    """Issue a user a new token (printed once); the old one is refused from the next request on. Audited."""
    with connect(data_dir) as fleet:
        doc = fleet.user_rotate(name)
    _issued(doc, as_json, "New token for")


@users_app.command("revoke")
def users_revoke(name: NameArg, data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False) -> None:
    """Revoke a user: their token is refused from the next request on; the audit trail keeps their name."""
    with connect(data_dir) as fleet:
        doc = fleet.user_revoke(name)
    if as_json:
        print_json(doc)
    else:
        out.print(f"Revoked [bold]{doc['name']}[/] ({doc['role']}): their token no longer signs in.")
