"""`fedfleet keys`: rotate the TUF root, the releases key and the director key, issue a new intermediate CA,
and encrypt the online keys at rest.

Keys that may live offline (with `fedfleet init --offline-keys DIR`): the TUF root key (root.pem) and the root
CA key (ca-root-key.pem). The commands that sign with one take `--offline-keys DIR` and say so in one sentence
when it is missing. Every change is recorded in the audit trail.
"""

from __future__ import annotations

import fcntl
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from server import audit
from server.cli.common import DEFAULT_DATA_DIR, DataDirOption, JsonOption, open_datadir, out, print_json
from server.datadir import DataDir
from server.errors import CoordinatorError
from server.trust.keyfile import ENV_PASSPHRASE, ENV_PASSPHRASE_FILE, encrypt_keys
from server.trust.repository import RELEASES_KEY

__all__ = ["OfflineKeysOption", "keys_app"]

keys_app = typer.Typer(
    help="Keys: rotate the TUF root, the releases or the director key; a new intermediate CA; encrypt keys at rest.",
    no_args_is_help=True,
)

OfflineKeysOption = Annotated[
    Path | None,
    typer.Option(
        "--offline-keys",
        help="The directory holding the offline keys (root.pem, ca-root-key.pem), e.g. a mounted USB stick.",
        file_okay=False,
    ),
]


def _audit(d: DataDir, action: str, subject: str, detail: Mapping[str, Any]) -> None:
    """One audit entry for a command whose change lies outside the database (keys, files)."""
    with d.store() as store:
        audit.append(store, action, subject, dict(detail), "cli")


def _refuse_while_serving(d: DataDir) -> None:
    """A running serve re-reads keys as it signs: encrypted under it, they would stop it signing."""
    path = d.root / "serve.lock"
    if not path.exists():
        return
    with path.open("rb") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text(errors="replace").strip() or "another process"
            raise CoordinatorError(
                f"a coordinator (pid {holder}) serves {d.root}: stop it, encrypt, and start it again with "
                f"{ENV_PASSPHRASE} or {ENV_PASSPHRASE_FILE} set"
            ) from None
        fcntl.flock(lock, fcntl.LOCK_UN)


@keys_app.command("rotate-root")
def keys_rotate_root(
    role: Annotated[
        list[str] | None,
        typer.Option(
            "--role",
            help="Also replace this online role's key: targets, snapshot or timestamp (repeat for several), "
            "for instance after the coordinator's disk was exposed.",
        ),
    ] = None,
    offline_keys: OfflineKeysOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Replace the TUF root key (and with --role online roles' keys); devices with any earlier root follow the
    signed chain to the new one, and metadata signed by a replaced key is refused from then on. A root key kept
    offline is read from --offline-keys, and its successor written there."""
    roles = ("root", *sorted(set(role or []) - {"root"}))
    d = open_datadir(data_dir)
    version = d.repository().rotate_root(roles, offline_keys)
    detail: dict[str, object] = {"root_version": version, "roles": list(roles), "offline": offline_keys is not None}
    _audit(d, "keys.rotate_root", "root", detail)
    if as_json:
        print_json({"root_version": version, "roles": list(roles)})
    else:
        where = f" (the new root key is in {offline_keys})" if offline_keys is not None else ""
        out.print(
            f"Root rotated: root version {version} is signed by the old and the new root key; "
            f"new keys for {', '.join(roles)}{where}."
        )


@keys_app.command("rotate-releases")
def keys_rotate_releases(data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False) -> None:
    """Replace the online key that signs each release's TUF role (keys/releases.pem); every release role is
    re-signed with the new key and devices follow at their next update. If it is interrupted, run it again."""
    d = open_datadir(data_dir)
    roles = d.repository().rotate_releases_key()
    _audit(d, "keys.rotate_releases", RELEASES_KEY, {"roles_resigned": roles})
    if as_json:
        print_json({"roles_resigned": roles})
    else:
        out.print(f"Releases key rotated: {roles} release role(s) re-signed with the new key; the old key is retired.")


@keys_app.command("rotate-director")
def keys_rotate_director(
    retire_previous: Annotated[
        bool,
        typer.Option(
            "--retire-previous",
            help="Trust only the new key from now on (a suspected compromise): agents refuse assignments signed by "
            "the previous one from their next update or freshness check. Every device's freshness statement is "
            "signed again with the new key.",
        ),
    ] = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Replace the key that signs assignments; running devices learn the new key through signed TUF metadata.
    A running `fedfleet serve` signs with the new key from its next tick."""
    from server.trust.director import Director

    d = open_datadir(data_dir)
    old, new = Director.rotate(d.keys, d.trust, d.repository(), retire_previous=retire_previous)
    restated = 0
    if retire_previous:  # statements the retired key signed would be refused: the new key states every device
        with d.store() as store:
            restated = d.director().restate_freshness(store)
    detail: dict[str, object] = {"old": old.key_id, "new": new.key_id, "retired": retire_previous}
    if retire_previous:
        detail["freshness_restated"] = restated
    _audit(d, "keys.rotate_director", "director", detail)
    if as_json:
        doc = {"old_key_id": old.key_id, "new_key_id": new.key_id, "previous_retired": retire_previous}
        print_json({**doc, "freshness_restated": restated} if retire_previous else doc)
    else:
        trust = "the old key is no longer trusted" if retire_previous else "both trusted until the next rotation"
        out.print(f"Director key rotated: {old.key_id[:16]}… → {new.key_id[:16]}… ({trust}).")


@keys_app.command("new-intermediate")
def keys_new_intermediate(
    offline_keys: OfflineKeysOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Sign a new issuing (intermediate) CA with the root CA key (from --offline-keys when it is kept offline).
    New certificates come from it; those of the previous one stay valid and its key stays online to sign their
    revocation list. Run `fedfleet broker config` again and reload Mosquitto to give the broker the new bundle."""
    d = open_datadir(data_dir)
    previous = d.ca()
    ca = previous.new_intermediate(offline_keys)
    with d.store() as store:
        ca.write_crl(store.revoked_certificates())
    detail = {"previous": format(previous.cert.serial_number, "x"), "new": format(ca.cert.serial_number, "x")}
    _audit(d, "keys.new_intermediate", "ca", detail)
    if as_json:
        print_json({"previous_serial": detail["previous"], "serial": detail["new"], "bundle": str(d.trust / "ca.pem")})
    else:
        out.print(
            f"New intermediate CA {detail['new']} issues certificates from now on; trust bundle {d.trust / 'ca.pem'}. "
            "Run `fedfleet broker config` again and reload Mosquitto."
        )


@keys_app.command("encrypt")
def keys_encrypt(data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False) -> None:
    """Encrypt every private key in DATA/keys (retired ones too) with the passphrase from FEDFLEET_KEY_PASSPHRASE
    or the file FEDFLEET_KEY_PASSPHRASE_FILE names; each file is replaced atomically (0600). From then on every
    command and `fedfleet serve` need the same variable. Keys already encrypted with it are left as they are."""
    d = open_datadir(data_dir)
    _refuse_while_serving(d)
    done = encrypt_keys(d.keys)
    _audit(d, "keys.encrypt", "keys", {"encrypted": [p.name for p in done.encrypted], "already": len(done.already)})
    if as_json:
        print_json({"encrypted": [str(p) for p in done.encrypted], "already_encrypted": [str(p) for p in done.already]})
    else:
        out.print(
            f"Encrypted {len(done.encrypted)} key(s) in {d.keys} ({len(done.already)} already were). "
            f"Give {ENV_PASSPHRASE} or {ENV_PASSPHRASE_FILE} to every fedfleet command from now on."
        )
