"""Enrollment bundles: what a device needs to start: agent.toml, the TUF trust root, the director keys, and its
TLS identity (a certificate from the fleet CA naming the device, its key, the CA certificate)."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig, config_from_dict
from edge_agent.contract import device_id_is_valid
from edge_agent.contract.files import atomic_write_bytes
from edge_agent.errors import ConfigError
from server import audit
from server.datadir import DataDir
from server.errors import CoordinatorError

__all__ = ["RESERVED_PREFIX", "running_endpoints", "write_bundle"]

RESERVED_PREFIX = "fedfleet-"  # names of fedfleet's own identities (server.trust.pki.COORDINATOR_IDENTITY)


def running_endpoints(d: DataDir) -> dict[str, Any]:
    """Where a running `fedfleet serve` listens (from DATA/serve.json), or {} if none runs."""
    try:
        doc: dict[str, Any] = json.loads((d.root / "serve.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc


def write_bundle(
    d: DataDir,
    device_id: str,
    out_dir: Path,
    fleet: str = "default",
    labels: Mapping[str, str] | None = None,
    grpc: str | None = None,
    mqtt: str | None = None,
    state_dir: str = "state",
    extra: Mapping[str, Any] | None = None,
    consent_training: bool | None = None,
) -> AgentConfig:
    """Write the bundle into out_dir and return the agent configuration it holds (checked before writing).
    `consent_training` becomes agent.toml's `[consent] training`, the owner's to change later (None: no [consent]
    table, which the device reports as no statement: no consent)."""
    if not device_id_is_valid(device_id):
        raise CoordinatorError(f"cannot enroll {device_id!r}: device_id must be letters, digits, '-', '_', '.'")
    if device_id.startswith(RESERVED_PREFIX):
        # The coordinator's own identity (fedfleet-coordinator) carries its broker rights: no device may hold it.
        raise CoordinatorError(f"cannot enroll {device_id!r}: names starting {RESERVED_PREFIX!r} are fedfleet's own")
    endpoints = running_endpoints(d)
    config = d.config()
    fields: dict[str, Any] = {
        "device_id": device_id,
        "fleet": fleet,
        "state_dir": state_dir,
        "grpc_target": grpc or endpoints.get("grpc") or config.grpc_listen,
        "mqtt_url": mqtt or endpoints.get("mqtt") or config.mqtt_url or f"mqtt://{config.embedded_broker_listen}",
        "trust_root": "root.json",
        "director_keys": "director_keys.json",
        "topic_prefix": config.topic_prefix,
        "grpc_tls": config.grpc_tls or bool(endpoints.get("grpc_tls")),  # `serve --tls` turns it on too
        "tls_ca": "ca.pem",
        "tls_cert": "device.pem",
        "tls_key": "device-key.pem",
        **(extra or {}),
    }
    lines = [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    lines += ["", "[labels]", *[f"{json.dumps(k)} = {json.dumps(v)}" for k, v in (labels or {}).items()], ""]
    if consent_training is not None:
        lines += ["[consent]", f"training = {json.dumps(consent_training)}", ""]
    toml = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "root.json", d.repository().root_bytes())
    atomic_write_bytes(out_dir / "director_keys.json", (d.trust / "director_keys.json").read_bytes())
    try:  # checked with the agent's own parser before anything is minted: a refusal issues no identity
        agent_config = config_from_dict(tomllib.loads(toml), out_dir)
    except (ConfigError, tomllib.TOMLDecodeError) as e:
        raise CoordinatorError(f"cannot enroll {device_id!r}: {e}") from e
    ca = d.ca()
    issued = ca.issue(device_id, client=True)
    atomic_write_bytes(out_dir / "ca.pem", ca.bundle_pem)  # the root and the issuing intermediate
    atomic_write_bytes(out_dir / "device-key.pem", issued.key_pem)
    atomic_write_bytes(out_dir / "device.pem", issued.cert_pem)
    with d.store() as store, store.transaction():
        # One live identity per name: enrolling it again (a replaced device, a lost key) revokes the previous one.
        previous = store.revoke_certificates(device_id)
        store.record_certificate(issued.serial, device_id, "device", int(issued.not_after.timestamp() * 1000))
        if previous:
            audit.append(store, "device.revoke", device_id, {"serials": previous, "why": "enrolled again"})
    if previous:
        with d.store() as store:
            ca.write_crl(store.revoked_certificates())
    atomic_write_bytes(out_dir / "agent.toml", toml.encode())
    return agent_config
