"""`fedfleet`: the coordinator's command line. It parses, calls the library, and turns library errors into one
sentence on stderr with a non-zero exit code. Commands that list or report take --json and then print one JSON
document and nothing else.

Exit codes: 0 success; 1 the command failed (the message says why and what to do); 2 usage error.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import importlib.metadata
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from edge_agent.contract import device_id_is_valid
from edge_agent.errors import AgentError
from edge_agent.runtime import load_model
from server import __version__, audit
from server.cli.anchor import audit_anchor
from server.cli.common import (
    DEFAULT_DATA_DIR,
    DataDirOption,
    JsonOption,
    fmt,
    local_time,
    open_datadir,
    out,
    parse_labels,
    print_json,
    progress,
)
from server.cli.config import config_app
from server.cli.context import ENV_CA, ENV_CONTEXT, ENV_SERVER, context_app
from server.cli.flower import flower_app
from server.cli.freshness import devices_behind
from server.cli.keys import OfflineKeysOption, keys_app
from server.cli.loop import alerts_app, loop_app
from server.cli.mirror import mirror_app
from server.cli.quiet import ENV_VERBOSE, native_stderr_quiet, quiet_third_parties
from server.cli.release_inputs import read_card, read_probe, release_remotely
from server.cli.releases import releases_retire, releases_show
from server.cli.remote import connect, is_remote
from server.cli.retention import retention_app
from server.cli.rollout import audit_app, rollout_app
from server.cli.status import status
from server.cli.train import models_app, privacy_app, train
from server.cli.users import users_app
from server.control import release_doc
from server.datadir import DataDir
from server.errors import CoordinatorError
from server.ingest.telemetry import pool
from server.store import now_ms
from server.store.telemetry import TelemetryRecords
from server.trust.enrollment import write_bundle
from server.trust.releases import publish_release

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
# A file release's version: MAJOR.MINOR.PATCH with an optional pre-release (semver.org; no +build, which target
# paths do not allow).
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?$")

app = typer.Typer(
    name="fedfleet",
    help="fedfleet coordinator: signed model releases, per-device assignments, the fleet's control plane.",
    epilog="Exit codes: 0 success, 1 failure (the message says what to do), 2 usage error.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish and PowerShell
)
devices_app = typer.Typer(
    help="Devices: list, show, enroll, label, revoke, and those behind their assignment.", no_args_is_help=True
)
releases_app = typer.Typer(
    help="Releases: list published models (trained model versions and .tflite files).", no_args_is_help=True
)
broker_app = typer.Typer(help="Broker: write a Mosquitto configuration with TLS and ACLs.", no_args_is_help=True)
app.add_typer(devices_app, name="devices")
devices_app.command("behind")(devices_behind)
app.add_typer(releases_app, name="releases")
app.add_typer(keys_app, name="keys")
app.add_typer(broker_app, name="broker")
app.add_typer(rollout_app, name="rollout")
app.add_typer(audit_app, name="audit")
app.add_typer(models_app, name="models")
app.add_typer(privacy_app, name="privacy")
app.add_typer(alerts_app, name="alerts")
app.add_typer(loop_app, name="loop")
app.add_typer(config_app, name="config")
app.add_typer(users_app, name="users")
app.add_typer(context_app, name="context")
app.add_typer(retention_app, name="retention")
releases_app.command("show")(releases_show)
releases_app.command("retire")(releases_retire)
audit_app.command("anchor")(audit_anchor)
app.add_typer(mirror_app, name="mirror")
app.command()(status)
app.add_typer(flower_app, name="flower")
app.command()(train)


@app.command()
def init(
    offline_keys: OfflineKeysOption = None, data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False
) -> None:
    """Create keys, the update repository, the database and config. Running it again changes nothing. With
    --offline-keys DIR the TUF root key and the root CA key go to DIR (a USB stick to unplug and store) instead of
    DATA/keys; an online intermediate CA enrolls devices. With FEDFLEET_KEY_PASSPHRASE (or _FILE) set, the online
    keys are written encrypted."""
    d, created = DataDir.init(data_dir, offline_keys)
    if as_json:
        offline = {"offline_keys": str(offline_keys)} if offline_keys is not None else {}
        print_json({"data_dir": str(d.root), "created": created, **offline})
    elif created:
        out.print(f"Initialised fedfleet data directory [bold]{d.root}[/]: keys, TUF repository, database, config.")
        if offline_keys is not None:
            out.print(
                f"The TUF root key and the root CA key are in [bold]{offline_keys}[/], not in the data directory: "
                "store it offline; `fedfleet keys rotate-root` and `keys new-intermediate` need it (--offline-keys)."
            )
    else:
        out.print(f"{d.root} is already initialised; nothing changed.")


@app.command()
def serve(
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    grpc: Annotated[str | None, typer.Option(help="gRPC listen address host:port (port 0: any free port).")] = None,
    mqtt: Annotated[str | None, typer.Option(help="Broker URL mqtt://host:port; default: embedded broker.")] = None,
    broker_listen: Annotated[str | None, typer.Option(help="Embedded broker address (loopback only).")] = None,
    dashboard: Annotated[
        str | None, typer.Option(help="Dashboard, API and /metrics address host:port; '' turns it off.")
    ] = None,
    public_read: Annotated[
        bool | None,
        typer.Option("--public-read/--token-read", help="Open the read-only views without the operator token."),
    ] = None,
    tls: Annotated[
        bool,
        typer.Option(help="Mutual TLS on gRPC and HTTPS on the dashboard (certificates from the fleet CA)."),
    ] = False,
    allow_plaintext_network: Annotated[
        bool,
        typer.Option(
            help="Lab only: accept plaintext gRPC, MQTT or dashboard beyond loopback (logged, and a dashboard banner)."
        ),
    ] = False,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Run the coordinator: gRPC FleetService, MQTT control plane (embedded broker if none given), rollouts, and
    the dashboard with its API and Prometheus /metrics (http://127.0.0.1:8080 by default). Plaintext is for loopback
    only: any other address needs --tls (or TLS in config.toml), and an mqtt:// broker beyond loopback mqtts://."""
    from server.coordinator import Coordinator, ServeOptions  # only `serve` needs gRPC, MQTT and the broker

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = ServeOptions(grpc, mqtt, broker_listen, dashboard, public_read, tls, allow_plaintext_network)
    coordinator = Coordinator(open_datadir(data_dir), options)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(coordinator.run())


@app.command("dashboard-token")
def dashboard_token(
    rotate: Annotated[bool, typer.Option(help="Issue a new token; the old one stops working at once.")] = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Print the operator token the dashboard asks for (created on first use, kept in DATA/keys/operator.token)."""
    d = open_datadir(data_dir)
    token = d.operator_token(rotate=rotate)
    if rotate:
        with d.store() as audit_store:
            audit.append(audit_store, "dashboard.token-rotated", "operator", {}, actor="cli")
    if as_json:
        print_json({"token": token})
        return
    sys.stdout.write(token + "\n")


@app.command()
def release(
    target: Annotated[str, typer.Argument(help="A registered model version (e.g. digits@3) or a .tflite file.")],
    name: Annotated[str | None, typer.Option(help="With a file: model name, e.g. digits.")] = None,
    version: Annotated[str | None, typer.Option(help="With a file: release version, e.g. 1.2.0.")] = None,
    quantize: Annotated[str, typer.Option(help="With a model version: 'int8' (dynamic range) or '' for float.")] = "",
    probe: Annotated[Path | None, typer.Option(help="With a file: probe set .npz with 'inputs' and 'outputs'.")] = None,
    card: Annotated[
        Path | None, typer.Option(help="With a file: model card as a JSON object, signed and checked by the policy.")
    ] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Publish a signed release. From a model version: export to TFLite (litert-torch), check parity with PyTorch
    in the agent's interpreter, attach the federated drift reference, a held-out probe set and the model card.
    From a file: check it runs. Either way the policy is checked and the release signed as a TUF target. Against a
    remote coordinator (--server, a context) a file is uploaded and checked there."""
    if is_remote():
        release_remotely(target, name, version, probe, card, as_json)
        return
    d = open_datadir(data_dir)
    path = Path(target)
    if path.is_file():
        if quantize:
            raise CoordinatorError("--quantize applies to a model version, not to a .tflite file")
        if not name or not version:
            raise CoordinatorError("releasing a file needs --name and --version")
        if not SEMVER.match(version):
            raise CoordinatorError(
                f"--version {version!r} is not a semantic version: give MAJOR.MINOR.PATCH, e.g. 1.2.0 "
                "(trained model versions are released as name@N)"
            )
        result = _release_file(d, path, name, version, probe, card)
        report = None
    elif "@" not in target or path.suffix or path.parent != Path("."):
        raise CoordinatorError(
            f"{target} is not a file (no such file from here, {Path.cwd()}); give a .tflite file that exists, "
            "or a trained model version like digits@1 (`fedfleet models list` shows them)"
        )
    else:
        if name or version or probe or card:
            raise CoordinatorError(
                f"{target!r} is a model version; --name, --version, --probe and --card apply to files only "
                "(a version's card and probe come from its registry entry)"
            )
        from server.fl.export import release_model_version

        progress(f"Exporting {target} to TFLite with litert-torch and checking parity (10-20 s)…")
        with native_stderr_quiet():
            report = release_model_version(d, target, quantize)
        result = report.release
    r = result.release
    if as_json:
        doc = {**release_doc(r), "created": result.created}
        if report is not None:
            doc["export"] = report.facts
        print_json(doc)
        return
    if report is not None:
        f = report.facts
        line = (
            f"parity: max |TFLite - PyTorch| = {f['parity_max_abs_diff']:.2e}; "
            f"held-out accuracy {f['accuracy_tflite']:.4f}"
        )
        if f["quantize"] != "none":
            line += (
                f" ({f['quantize']}: {f['float_bytes']} -> {f['bytes']} bytes, "
                f"accuracy {f['accuracy_float_tflite']:.4f} -> {f['accuracy_tflite']:.4f})"
            )
        out.print(line)
    if result.created:
        out.print(f"Released [bold]{r.id}[/] ({r.length} bytes, sha256 {r.sha256[:12]}…) as {r.target_path}.")
    else:
        out.print(f"{r.id} was already released with these bytes; nothing changed.")


def _release_file(d: DataDir, model_file: Path, name: str, version: str, probe: Path | None, card: Path | None) -> Any:
    try:  # here, so that a refusal names the user's file rather than the copy the release is checked in
        with native_stderr_quiet():
            load_model(model_file)
    except AgentError as e:
        raise CoordinatorError(f"{model_file} is not a loadable TFLite model ({e})") from e
    extra: dict[str, Any] = {}
    model_card = read_card(card)
    if model_card is not None:
        extra["model_card"] = model_card
    probe_doc = read_probe(probe)
    with d.store() as store, native_stderr_quiet():
        return publish_release(
            d.repository(), store, model_file.read_bytes(), name, version, probe_doc, extra, d.policy()
        )


@releases_app.command("list")
def releases_list(data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False) -> None:
    """List published releases, newest first. Source `trained`: a model version of `fedfleet train` released as
    name@N (exported, parity-checked, with its drift reference and model card); `file`: a .tflite file released as
    name@MAJOR.MINOR.PATCH. A retired release is listed with the time it was retired."""
    with connect(data_dir) as fleet:
        rows = fleet.releases()
    if as_json:
        print_json(rows)
        return
    table = Table("release", "source", "target", "bytes", "sha256", "created", "retired", "running")
    for r in rows:
        table.add_row(
            r["id"],
            r["source"]["kind"],
            r["target"],
            str(r["bytes"]),
            r["sha256"][:16],
            local_time(r["created_at"]),
            local_time(r["retired_at"]),
            str(r["devices_running"]),
        )
    out.print(table)


@app.command()
def assign(
    args: Annotated[
        list[str],
        typer.Argument(
            metavar="[DEVICE] RELEASE",
            help="A device id and a release id (name@version), or only the release with --fleet.",
        ),
    ],
    fleet: Annotated[str | None, typer.Option(help="Assign to every registered device of this fleet.")] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Issue signed assignments (next counter per device); a running `fedfleet serve` delivers them.

    `fedfleet assign DEVICE RELEASE` or `fedfleet assign --fleet F RELEASE`. Assigning an older release is a
    fleet rollback: a new assignment with a higher counter.
    """
    if fleet is None and len(args) != 2:
        raise CoordinatorError("give DEVICE RELEASE, or --fleet F RELEASE")
    if fleet is not None and len(args) != 1:
        raise CoordinatorError("with --fleet give only the RELEASE")
    *device, release_id = args
    with connect(data_dir) as fleet_api:
        doc = fleet_api.assign(release_id, device, fleet)
    if as_json:
        print_json(doc)
    else:
        out.print(f"Assigned {doc['release']} to {len(doc['assignments'])} device(s).")


@devices_app.command("list")
def devices_list(
    fleet: Annotated[str | None, typer.Option(help="Only this fleet.")] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Each device: fleet, labels, online state, assigned and running release, last event."""
    with connect(data_dir) as fleet_api:
        docs = fleet_api.devices(fleet)
    if as_json:
        print_json(docs)
        return
    table = Table("device", "fleet", "labels", "online", "assigned", "running", "last event")
    for doc in docs:
        labels = ",".join(f"{k}={v}" for k, v in doc["labels"].items())
        table.add_row(
            doc["id"],
            doc["fleet"],
            labels,
            "yes" if doc["online"] else "no",
            doc["assigned_release"] or "-",
            doc["running_release"] or "-",
            doc["last_event"] or "-",
        )
    out.print(table)


@devices_app.command("show")
def devices_show(
    device_id: Annotated[str, typer.Argument(metavar="DEVICE")],
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """One device with its hardware and its latest update events."""
    with connect(data_dir) as fleet:
        doc = fleet.device(device_id)
    if as_json:
        print_json(doc)
        return
    for key, value in doc.items():
        if key != "events":
            out.print(f"[bold]{key}[/]: {_shown(key, value)}", highlight=False)
    table = Table("time", "event", "counter", "release", "reason", "detail")
    for e in doc["events"]:
        table.add_row(
            local_time(e["received_at"]), e["kind"], str(e["counter"]), e["release_id"], e["reason"], e["detail"][:80]
        )
    out.print(table)


def _shown(key: str, value: Any) -> str:
    """A device field as a person reads it: k=v pairs, local ISO-8601 times, '-' for nothing."""
    if value is None or value in ("", {}):
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
    if key in ("last_seen",) and isinstance(value, int):
        return local_time(value)
    return str(value)


@devices_app.command("label")
def devices_label(
    device_id: Annotated[str, typer.Argument(metavar="NAME", help="The device id.")],
    fleet: Annotated[str | None, typer.Option(help="Move the device to this fleet.")] = None,
    label: Annotated[list[str] | None, typer.Option(help="A label k=v; repeat for more. Replaces all labels.")] = None,
    clear_labels: Annotated[bool, typer.Option("--clear-labels", help="Remove every label.")] = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Set a device's fleet or labels. They are the coordinator's: what a device claims when it registers again
    is ignored. Rollouts already planned keep their waves. Recorded in the audit trail."""
    if fleet is None and label is None and not clear_labels:
        raise typer.BadParameter("give --fleet, --label or --clear-labels")
    if fleet is not None and not device_id_is_valid(fleet):
        raise CoordinatorError(f"fleet {fleet!r} must be letters, digits, '-', '_', '.'")
    labels = {} if clear_labels else (parse_labels(label) if label is not None else None)
    with connect(data_dir) as coordinator:
        row = coordinator.place_device(device_id, fleet, labels)
    if as_json:
        print_json({"device": device_id, "fleet": row["fleet"], "labels": row["labels"]})
    else:
        out.print(f"[bold]{device_id}[/]: fleet {row['fleet']}, labels {_shown('labels', row['labels']) or 'none'}.")


@devices_app.command("enroll")
def devices_enroll(
    device_id: Annotated[str, typer.Argument(metavar="NAME", help="The device id.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the enrollment bundle.")],
    fleet: Annotated[str, typer.Option(help="The device's fleet.")] = "default",
    label: Annotated[list[str] | None, typer.Option(help="A label k=v; repeat for more.")] = None,
    grpc: Annotated[str | None, typer.Option(help="Coordinator gRPC address the device dials.")] = None,
    mqtt: Annotated[str | None, typer.Option(help="Broker URL the device connects to.")] = None,
    state_dir: Annotated[str, typer.Option(help="Agent state directory (relative: to the bundle).")] = "state",
    force: Annotated[
        bool, typer.Option("--force", help="Enroll a device that is enrolled already: its certificate is revoked.")
    ] = False,
    consent_training: Annotated[
        bool,
        typer.Option(
            "--consent-training/--no-consent-training",
            help="The owner's consent to train on the device's data, written to agent.toml [consent] training "
            "(the owner may change it there; the agent reports it when it registers).",
        ),
    ] = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Write an enrollment bundle: agent.toml, the TUF trust root and the director keys, and the device's
    certificate. A name that is enrolled already is refused unless --force (a replaced device, a lost key): the
    old certificate is then revoked and the device must take the new bundle."""
    d = open_datadir(data_dir)
    labels = parse_labels(label or [])
    with d.store() as store:
        enrolled = store.live_certificates(device_id)
    if enrolled and not force:
        raise CoordinatorError(
            f"{device_id} is enrolled already (a live certificate); enrolling it again revokes that certificate, "
            "so the device must take the new bundle: add --force to do that"
        )
    write_bundle(d, device_id, out_dir, fleet, labels, grpc, mqtt, state_dir, consent_training=consent_training)
    detail = {"fleet": fleet, "labels": labels, "bundle": str(out_dir), "consent_training": consent_training}
    _audit(d, "device.enroll", device_id, detail, "coordinator")
    if as_json:
        print_json(
            {
                "device": device_id,
                "bundle": str(out_dir),
                "config": str(out_dir / "agent.toml"),
                "consent_training": consent_training,
            }
        )
    else:
        out.print(
            f"Enrollment bundle for [bold]{device_id}[/] written to {out_dir} "
            f"(run: fedfleet-agent run --config {out_dir / 'agent.toml'})."
        )


@devices_app.command("revoke")
def devices_revoke(
    device_id: Annotated[str, typer.Argument(metavar="NAME", help="The device id.")],
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Revoke a device's certificates: the gRPC server refuses it at once; the broker after `fedfleet broker config`
    rewrites its CRL and Mosquitto reloads. Recorded in the audit trail. Remotely (--server, --context) it needs
    the devices.manage permission."""
    with connect(data_dir) as fleet:
        doc = fleet.revoke_device(device_id)
    if as_json:
        print_json(doc)
    else:
        out.print(
            f"Revoked {len(doc['revoked'])} certificate(s) of [bold]{device_id}[/]; CRL at {doc['crl']} (on the "
            "coordinator). Run `fedfleet broker config` again and reload Mosquitto."
        )


@broker_app.command("config")
def broker_config(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for mosquitto.conf, ACL, certificates, CRL.")],
    port: Annotated[int, typer.Option(help="TLS listener port.")] = 8883,
    bind: Annotated[str, typer.Option(help="Address the listener binds.")] = "127.0.0.1",
    host: Annotated[
        list[str] | None,
        typer.Option(help="A name or IP devices use to reach the broker; repeat. [default: 127.0.0.1, localhost]"),
    ] = None,
    run_as: Annotated[str | None, typer.Option(help="Mosquitto's `user` setting. [default: Mosquitto's own]")] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Write a Mosquitto configuration: TLS with client certificates from the fleet CA, the certificate name as
    username, the CRL, and an ACL that lets each device write only its own topics and read only its own state."""
    from server.trust.broker_config import BrokerConfig, write_broker_config

    hosts = tuple(host) if host else ("127.0.0.1", "localhost")
    written = write_broker_config(open_datadir(data_dir), BrokerConfig(out_dir, port, bind, hosts, run_as))
    if as_json:
        print_json({"config": str(written[0]), "files": [str(p) for p in written]})
    else:
        out.print(f"Mosquitto configuration written: mosquitto -c {written[0]}")


@app.command()
def telemetry(
    device: Annotated[str | None, typer.Option(help="Only this device's windows.")] = None,
    release_id: Annotated[str | None, typer.Option("--release", help="Only this release (name@version).")] = None,
    label: Annotated[list[str] | None, typer.Option(help="Only the cohort with this label k=v; repeatable.")] = None,
    last: Annotated[float | None, typer.Option(help="Only windows that ended in the last N minutes.")] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Pooled drift and health statistics per release: PSI/KL against the release's reference, latency, errors."""
    with open_datadir(data_dir).store() as store:
        cohort: list[str] | None = None
        if device is not None:
            store.device(device)
            cohort = [device]
        if label:
            labelled = store.devices_with_labels(parse_labels(label))
            cohort = labelled if cohort is None else [d for d in cohort if d in labelled]
        if release_id:
            store.release(release_id)
        since = 0 if last is None else now_ms() - int(last * 60_000)
        releases = [release_id] if release_id else TelemetryRecords(store).releases_since(since)
        docs = [pool(store, r, cohort, since_ms=since).to_json() for r in sorted(releases)]
    if as_json:
        print_json(docs)
        return
    table = Table("release", "devices", "windows", "inferences", "errors", "max PSI", "score PSI", "p95 ms")
    for d in docs:
        table.add_row(
            d["release"],
            str(d["devices"]),
            str(d["windows"]),
            str(d["inferences"]),
            str(d["errors"]),
            fmt(d["max_psi"]),
            fmt(d["score_psi"]),
            fmt(d["latency_p95_ms"]),
        )
    out.print(table)


def _audit(d: DataDir, action: str, subject: str, detail: dict[str, Any], actor: str = "cli") -> None:
    """One audit entry for a command whose change lies outside the database (keys, files)."""
    with d.store() as store:
        audit.append(store, action, subject, detail, actor)


@app.command()
def version() -> None:
    """Print the fedfleet version."""
    sys.stdout.write(f"fedfleet {__version__}\n")


def _version_option(value: bool) -> None:
    if value:
        version()
        raise typer.Exit(EXIT_OK)


@app.callback()
def _options(
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            envvar=ENV_SERVER,
            help="Run against this coordinator's API (https://host:port) instead of a data directory; with "
            "--token-file or FEDFLEET_TOKEN.",
        ),
    ] = None,
    context: Annotated[
        str | None,
        typer.Option("--context", envvar=ENV_CONTEXT, help="Run against this named coordinator (`fedfleet context`)."),
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option("--token-file", help="With --server: a file holding your token.")
    ] = None,
    ca: Annotated[
        Path | None,
        typer.Option("--ca", envvar=ENV_CA, help="The fleet CA's certificate that the coordinator's HTTPS must match."),
    ] = None,
    show_version: Annotated[
        bool,
        typer.Option("--version", help="Print the fedfleet version and exit.", is_eager=True, callback=_version_option),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", envvar=ENV_VERBOSE, help="Show third-party libraries' logs and warnings (TensorFlow, Ray, …)."
        ),
    ] = False,
) -> None:
    """fedfleet coordinator: signed model releases, per-device assignments, the fleet's control plane."""


PLUGINS = "fedfleet.commands"  # entry points: callables that add commands to `app` (e.g. simulate, demo)


def load_plugins() -> None:
    """Add the commands other installed packages offer (`fedfleet simulate`, `fedfleet demo` from simulations)."""
    for entry in importlib.metadata.entry_points(group=PLUGINS):
        try:
            entry.load()(app)
        except Exception as e:  # a broken plugin must not take the coordinator's own commands with it
            sys.stderr.write(f"fedfleet: commands from {entry.value} are unavailable ({type(e).__name__}: {e})\n")


def main() -> None:
    # `kill -USR1 <pid>` prints every thread's stack to stderr: how a stuck coordinator or demo tells where.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if "--verbose" in sys.argv[1:2]:  # before any command imports the libraries it quiets
        os.environ[ENV_VERBOSE] = "1"
    quiet_third_parties()
    load_plugins()
    try:
        app()
    except CoordinatorError as e:
        sys.stderr.write(f"fedfleet: {e}\n")
        sys.exit(EXIT_FAILURE)
