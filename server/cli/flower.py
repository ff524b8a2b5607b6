"""`fedfleet flower`: the credentials of Flower's deployment engine (docs/training.md, ADR 0004).

Flower 1.41 serves its Fleet, Control and Runtime APIs on one HTTPS port of the SuperLink, and authenticates each
SuperNode by an EC key pair whose public half was registered with the SuperLink (`flower-superlink
--enable-supernode-auth`, `flwr supernode register`; every Fleet request is then signed). Three commands:

- `credentials` issues the SuperLink's TLS server certificate from the fleet CA (so SuperNodes, `flwr` and the
  SuperLink's own SuperExec verify it with the fleet's ca.pem) and writes the three files `flower-superlink`
  takes: superlink.pem (the leaf, then its intermediate), superlink-key.pem (0600) and ca.pem (the trust bundle).
- `node-key BUNDLE` makes the Flower key of one enrolled device, from its enrollment bundle: the bundle's
  certificate must be a live one of this fleet (a revoked or foreign bundle gets no key), the device id is its
  name, and the key lands in the bundle beside the device's TLS identity (flower-node-key, OpenSSH format, 0600,
  with flower-node-key.pub), where the device's SuperNode reads it (`--auth-supernode-private-key`). With
  `--superlink HOST:PORT` the public key is registered there first (`flwr supernode register`, verified with the
  fleet CA): a failed registration writes nothing. With `--replace --superlink` the device's earlier nodes are
  unregistered once the new key is in place.
- `unregister DEVICE --superlink HOST:PORT` removes every node registered for a device (after `fedfleet devices
  revoke`, which does not reach the SuperLink by itself). The node ids are found in the audit trail
  (flower.node-key, flower.node-unregistered): the coordinator's record of which key is whose.

Invariants: bad input changes nothing (checked before a key or certificate is minted); every issue is audited.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_agent.contract import device_id_is_valid
from edge_agent.contract.files import atomic_write_bytes
from server import audit
from server.cli.common import DEFAULT_DATA_DIR, DataDirOption, JsonOption, open_datadir, out, print_json
from server.datadir import DataDir
from server.errors import CoordinatorError

__all__ = [
    "NODE_KEY",
    "SUPERLINK_IDENTITY",
    "NodeKey",
    "SuperLinkCredentials",
    "flower_app",
    "issue_superlink_credentials",
    "make_node_key",
    "registered_nodes",
    "unregister_nodes",
]

SUPERLINK_IDENTITY = "fedfleet-superlink"  # the common name of the SuperLink's server certificate
SUPERLINK_KIND = "flower-superlink"  # its kind in the certificates table
NODE_KEY = "flower-node-key"  # in an enrollment bundle: the device's SuperNode key (OpenSSH private key, 0600)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")  # the SuperLink's SuperExec dials the Runtime API on loopback
_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_FLWR_TIMEOUT = 60.0
_AUDIT_SCAN = 1_000_000  # audit entries read to find a device's nodes: all of them

flower_app = typer.Typer(
    help="Flower's deployment engine: the SuperLink's TLS certificate, the SuperNodes' authentication keys.",
    no_args_is_help=True,
)


@dataclass(frozen=True)
class SuperLinkCredentials:
    cert: Path  # superlink.pem: the leaf, then the intermediate that issued it
    key: Path  # superlink-key.pem (0600)
    ca: Path  # ca.pem: what SuperNodes, `flwr` and the SuperExec verify the SuperLink with
    hosts: tuple[str, ...]
    serial: str

    def command(self, bind: str, port: int) -> list[str]:
        """The `flower-superlink` command line that serves with these files and SuperNode authentication."""
        return [
            "flower-superlink",
            "--ssl-certfile",
            str(self.cert),
            "--ssl-keyfile",
            str(self.key),
            "--ssl-ca-certfile",
            str(self.ca),
            "--enable-supernode-auth",
            "--host",
            bind,
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ]


@dataclass(frozen=True)
class NodeKey:
    device: str
    private_key: Path  # BUNDLE/flower-node-key
    public_key: Path  # BUNDLE/flower-node-key.pub
    node_id: int | None  # the SuperLink's node id when it was registered
    unregistered: tuple[int, ...] = ()  # the device's earlier nodes, unregistered once this one was registered


def _checked_hosts(hosts: list[str]) -> tuple[str, ...]:
    """The certificate's names: the given ones (IP addresses or DNS names), then loopback, each once."""
    names: list[str] = []
    for host in [*hosts, *LOOPBACK_HOSTS]:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if not _HOST_NAME.match(host):
                raise CoordinatorError(
                    f"--host {host!r} is neither an IP address nor a DNS name: give the name SuperNodes dial"
                ) from None
        else:
            if ip.is_unspecified:
                raise CoordinatorError(
                    f"--host {host} is a bind address, not a name SuperNodes dial: give the coordinator's name or IP"
                )
        if host not in names:
            names.append(host)
    return tuple(names)


def issue_superlink_credentials(d: DataDir, out_dir: Path, hosts: list[str]) -> SuperLinkCredentials:
    """Issue the SuperLink's server certificate for `hosts` (and loopback) and write its files to out_dir. A
    previous SuperLink certificate is revoked (one live one, as for devices)."""
    names = _checked_hosts(hosts)
    ca = d.ca()
    issued = ca.issue(SUPERLINK_IDENTITY, client=False, hosts=names)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    creds = SuperLinkCredentials(
        out_dir / "superlink.pem", out_dir / "superlink-key.pem", out_dir / "ca.pem", names, issued.serial
    )
    atomic_write_bytes(creds.key, issued.key_pem)  # 0600 (mkstemp)
    atomic_write_bytes(creds.cert, issued.cert_pem)
    atomic_write_bytes(creds.ca, ca.bundle_pem)
    with d.store() as store:
        with store.transaction():
            previous = store.revoke_certificates(SUPERLINK_IDENTITY, kind=SUPERLINK_KIND)
            store.record_certificate(
                issued.serial, SUPERLINK_IDENTITY, SUPERLINK_KIND, int(issued.not_after.timestamp() * 1000)
            )
            detail = {"serial": issued.serial, "hosts": list(names), "out": str(out_dir), "revoked": previous}
            audit.append(store, "flower.superlink-credentials", SUPERLINK_IDENTITY, detail, "cli")
        if previous:
            ca.write_crl(store.revoked_certificates())
    return creds


def _enrolled_device(d: DataDir, bundle: Path) -> str:
    """The device id of an enrollment bundle whose certificate is a live one of this fleet."""
    cert_path = bundle / "device.pem"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as e:
        raise CoordinatorError(
            f"{bundle} is not an enrollment bundle (no readable device.pem: {e}); `fedfleet devices enroll NAME "
            f"--out {bundle}` writes one"
        ) from e
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    device = str(names[0].value) if names else ""
    serial = format(cert.serial_number, "x")
    with d.store() as store:
        revoked = store.certificate_revoked(serial)  # unknown serials (another fleet's) count as revoked
    if revoked or not device_id_is_valid(device):
        raise CoordinatorError(
            f"the certificate in {cert_path} ({device or 'no name'}, serial {serial}) is not a live certificate of "
            "this fleet (revoked, or never issued here): enroll the device again and use the new bundle"
        )
    return device


def _flwr() -> str:
    beside = Path(sys.executable).parent / "flwr"
    found = str(beside) if beside.exists() else shutil.which("flwr")
    if not found:
        raise CoordinatorError("`flwr` is not installed beside fedfleet: install fedfleet[server]")
    return found


def _flwr_supernode(d: DataDir, superlink: str, args: list[str], files: dict[str, bytes]) -> tuple[dict[str, Any], str]:
    """Run `flwr supernode ARGS` against the SuperLink at `superlink`, verified with the fleet CA; `files` are
    written beside its configuration first (names in ARGS are relative to it). Returns (Flower's JSON answer,
    or {} if there was none; what it said, on one line)."""
    with tempfile.TemporaryDirectory(prefix="fedfleet-flwr-") as tmp:
        home = Path(tmp)
        for name, data in files.items():
            (home / name).write_bytes(data)
        ca = str((d.trust / "ca.pem").resolve())
        connection = f"address = {json.dumps(superlink)}\nroot-certificates = {json.dumps(ca)}\n"
        (home / "config.toml").write_text(f'[superlink]\ndefault = "fedfleet"\n\n[superlink.fedfleet]\n{connection}')
        command = [_flwr(), "supernode", *[str(home / a) if a in files else a for a in args], "--format", "json"]
        try:
            done = subprocess.run(
                command,
                env={**os.environ, "FLWR_HOME": str(home)},
                capture_output=True,
                text=True,
                timeout=_FLWR_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise CoordinatorError(
                f"the SuperLink at {superlink} did not answer within {_FLWR_TIMEOUT:.0f} s; is it running with "
                "`fedfleet flower credentials`' files?"
            ) from e
    doc: dict[str, Any] = {}
    try:
        parsed = json.loads(done.stdout)
        doc = parsed if isinstance(parsed, dict) and done.returncode == 0 else {}
    except ValueError:
        pass
    said = " ".join(str(doc.get("error-message") or done.stderr or done.stdout).split())
    return doc, said


def _register(d: DataDir, superlink: str, public_key: bytes, device: str) -> int:
    """Register a SuperNode public key with the SuperLink (Flower's `flwr supernode register`); its node id."""
    doc, said = _flwr_supernode(
        d, superlink, ["register", "node.pub", "fedfleet", "--name", device], {"node.pub": public_key}
    )
    if not doc.get("success") or not doc.get("node-id"):
        raise CoordinatorError(
            f"the SuperLink at {superlink} did not register {device}'s key ({said or 'no answer'}); start it "
            "with TLS from `fedfleet flower credentials` and --enable-supernode-auth, and check the address"
        )
    return int(doc["node-id"])


def registered_nodes(d: DataDir, device: str) -> list[int]:
    """The SuperLink node ids registered for a device (audit entries flower.node-key) and not unregistered
    since (flower.node-unregistered), oldest first."""
    with d.store() as store:
        made = audit.entries(store, limit=_AUDIT_SCAN, action="flower.node-key")
        gone = audit.entries(store, limit=_AUDIT_SCAN, action="flower.node-unregistered")
    removed = {int(e["detail"]["node_id"]) for e in gone if e["subject"] == device}
    ids = [int(e["detail"]["node_id"]) for e in reversed(made) if e["subject"] == device and e["detail"]["node_id"]]
    return [i for i in ids if i not in removed]


def unregister_nodes(
    d: DataDir, device: str, superlink: str, node_ids: list[int], then: str = "run `fedfleet flower unregister` again"
) -> list[int]:
    """Unregister these nodes of a device from the SuperLink (`flwr supernode unregister`), each audited as
    it goes; returns them. Stops at the first the SuperLink refuses, with one sentence ending in `then`."""
    for node_id in node_ids:
        doc, said = _flwr_supernode(d, superlink, ["unregister", str(node_id), "fedfleet"], {})
        if not doc.get("success"):
            raise CoordinatorError(
                f"the SuperLink at {superlink} did not unregister {device}'s node {node_id} ({said or 'no answer'}); "
                f"check the address, then {then}"
            )
        with d.store() as store:
            detail = {"node_id": node_id, "superlink": superlink}
            audit.append(store, "flower.node-unregistered", device, detail, "cli")
    return node_ids


def make_node_key(d: DataDir, bundle: Path, superlink: str | None = None, replace: bool = False) -> NodeKey:
    """Make the Flower SuperNode key of the device whose enrollment bundle this is, register it with the
    SuperLink when `superlink` is given, then write it into the bundle. Nothing is written on any refusal."""
    device = _enrolled_device(d, bundle)
    private_path, public_path = bundle / NODE_KEY, bundle / f"{NODE_KEY}.pub"
    if private_path.exists() and not replace:
        raise CoordinatorError(
            f"{bundle} already holds a Flower key for {device}; --replace makes a new one (with --superlink its "
            "earlier nodes are unregistered there)"
        )
    key = ec.generate_private_key(ec.SECP384R1())  # a NIST curve, as Flower's node authentication requires
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public += f" fedfleet:{device}\n".encode()
    previous = registered_nodes(d, device) if superlink else []
    node_id = _register(d, superlink, public, device) if superlink else None
    atomic_write_bytes(private_path, private_pem)  # 0600 (mkstemp)
    atomic_write_bytes(public_path, public)
    with d.store() as store:
        detail = {"bundle": str(bundle), "superlink": superlink, "node_id": node_id, "public_key": public.decode()}
        audit.append(store, "flower.node-key", device, detail, "cli")
    if superlink and previous:  # the replaced keys stop working once the new one is in place
        then = (
            f"remove the earlier node(s) with `flwr supernode unregister ID` (the new key, node {node_id}, is in place)"
        )
        unregister_nodes(d, device, superlink, previous, then)
    return NodeKey(device, private_path, public_path, node_id, tuple(previous))


@flower_app.command("credentials")
def credentials(
    host: Annotated[
        list[str] | None,
        typer.Option(help="A name or IP SuperNodes dial to reach the SuperLink; repeat. Loopback is always added."),
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Where to write the files. [default: DATA/flower]")
    ] = None,
    port: Annotated[int, typer.Option(help="Only for the printed command line: the SuperLink's port.")] = 9091,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Issue the SuperLink's TLS certificate from the fleet CA: superlink.pem, superlink-key.pem and ca.pem, for
    `flower-superlink --ssl-certfile --ssl-keyfile --ssl-ca-certfile --enable-supernode-auth`. Running it again
    issues a new certificate and revokes the previous one."""
    d = open_datadir(data_dir)
    target = out_dir if out_dir is not None else d.root / "flower"
    creds = issue_superlink_credentials(d, target, host or [])
    bind = "0.0.0.0" if any(h not in LOOPBACK_HOSTS for h in creds.hosts) else "127.0.0.1"
    command = creds.command(bind, port)
    if as_json:
        print_json(
            {
                "cert": str(creds.cert),
                "key": str(creds.key),
                "ca": str(creds.ca),
                "hosts": list(creds.hosts),
                "serial": creds.serial,
                "command": command,
            }
        )
        return
    out.print(f"SuperLink certificate for {', '.join(creds.hosts)} written to {target}. Start it with:")
    out.print(" ".join(command), markup=False, highlight=False)
    out.print("Then give each device a key: `fedfleet flower node-key BUNDLE --superlink HOST:PORT`.")
    if bind != "127.0.0.1":
        out.print(
            "Flower's Control API (flwr run, flwr supernode register) shares this port without authentication: "
            "let only the devices' network reach it (docs/adr/0004-transport-security.md, Flower)."
        )


@flower_app.command("node-key")
def node_key(
    bundle: Annotated[Path, typer.Argument(help="The device's enrollment bundle (`fedfleet devices enroll --out`).")],
    superlink: Annotated[
        str | None,
        typer.Option(help="Register the public key with the SuperLink at HOST:PORT (TLS, verified with the fleet CA)."),
    ] = None,
    replace: Annotated[
        bool,
        typer.Option(help="Replace a Flower key the bundle holds; with --superlink the device's earlier nodes go."),
    ] = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Make an enrolled device's SuperNode authentication key (EC P-384) in its enrollment bundle, beside its TLS
    identity: flower-node-key (0600, for `flower-supernode --auth-supernode-private-key`) and flower-node-key.pub;
    with --superlink it is registered there first, and nothing is written if that fails."""
    d = open_datadir(data_dir)
    made = make_node_key(d, bundle, superlink, replace)
    if as_json:
        print_json(
            {
                "device": made.device,
                "private_key": str(made.private_key),
                "public_key": str(made.public_key),
                "node_id": made.node_id,
                "unregistered": list(made.unregistered),
            }
        )
        return
    registered = f" and registered as SuperNode {made.node_id}" if made.node_id is not None else ""
    out.print(f"Flower key of [bold]{made.device}[/] written to {made.private_key}{registered}.")
    if made.unregistered:
        out.print(f"Its earlier node(s) {', '.join(map(str, made.unregistered))} are unregistered.")
    if made.node_id is None:
        out.print(f"Register it on the SuperLink: flwr supernode register {made.public_key}", markup=False)


@flower_app.command("unregister")
def unregister(
    device: Annotated[str, typer.Argument(metavar="DEVICE", help="The device whose SuperNode(s) to remove.")],
    superlink: Annotated[str, typer.Option(help="The SuperLink at HOST:PORT (TLS, verified with the fleet CA).")],
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Unregister every SuperLink node `fedfleet flower node-key` registered for a device (after `fedfleet devices
    revoke`: revocation does not reach the SuperLink by itself); its key is refused from then on."""
    d = open_datadir(data_dir)
    nodes = registered_nodes(d, device)
    if not nodes:
        raise CoordinatorError(
            f"{device!r} has no registered SuperLink node on record (`fedfleet flower node-key BUNDLE --superlink` "
            "registers one)"
        )
    gone = unregister_nodes(d, device, superlink, nodes)
    if as_json:
        print_json({"device": device, "unregistered": gone})
    else:
        out.print(f"Unregistered {device}'s SuperLink node(s) {', '.join(map(str, gone))}.")
