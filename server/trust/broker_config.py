"""`fedfleet broker config`: a Mosquitto configuration for the fleet: TLS with client certificates from the fleet
CA, the certificate's common name as the MQTT username, a revocation list, and an ACL in which a device writes
only its own status, events and telemetry and reads only its own desired state and acknowledgements, while only
the coordinator writes desired state.

Running it again keeps the broker's certificate (unless the host names change) and refreshes crl.pem: after
`fedfleet devices revoke`, run it again and reload Mosquitto.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_agent.contract import LIMITS, Topics
from edge_agent.contract.files import atomic_write_bytes
from server.datadir import DataDir
from server.errors import CoordinatorError
from server.trust.pki import COORDINATOR_IDENTITY

__all__ = ["BrokerConfig", "acl_text", "write_broker_config"]

BROKER_IDENTITY = "fedfleet-broker"


@dataclass(frozen=True)
class BrokerConfig:
    out_dir: Path
    port: int = 8883
    bind: str = "127.0.0.1"
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
    run_as: str | None = None  # Mosquitto's `user`; None: its default (it drops root to "mosquitto")

    @property
    def conf(self) -> Path:
        return self.out_dir / "mosquitto.conf"


def acl_text(prefix: str) -> str:
    t = Topics(prefix)
    device = "%u"  # Mosquitto substitutes the username: the device certificate's common name
    return "\n".join(
        [
            "# written by `fedfleet broker config`",
            "# the coordinator (its certificate's common name) reads and writes the whole tree",
            f"user {COORDINATOR_IDENTITY}",
            f"topic readwrite {prefix}/#",
            "",
            "# a device (common name = device id) writes only its own status, events and telemetry ...",
            f"pattern write {t.status(device)}",
            f"pattern write {t.events(device)}",
            f"pattern write {t.telemetry(device)}",
            "# ... and reads only its own desired state, freshness statement and telemetry acknowledgements",
            f"pattern read {t.desired(device)}",
            f"pattern read {t.freshness(device)}",
            f"pattern read {t.ack(device)}",
            "",
        ]
    )


def write_broker_config(d: DataDir, config: BrokerConfig) -> list[Path]:
    """Write the configuration, certificates, CRL and ACL into config.out_dir; returns the files written."""
    if not 0 < config.port < 65536:
        raise CoordinatorError(f"port {config.port} is not a TCP port")
    if not config.hosts:
        raise CoordinatorError("give at least one --host the devices use to reach the broker")
    out = config.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ca = d.ca()
    with d.store() as store:
        cert, key = out / "broker.pem", out / "broker-key.pem"
        ca.ensure_files(store, BROKER_IDENTITY, "broker", config.hosts, cert, key)
        crl = ca.write_crl(store.revoked_certificates())
    atomic_write_bytes(out / "ca.pem", ca.bundle_pem)  # root + intermediate: Mosquitto verifies the chain
    atomic_write_bytes(out / "crl.pem", crl.read_bytes())
    atomic_write_bytes(out / "acl", acl_text(d.config().topic_prefix).encode())
    lines = [
        "# written by `fedfleet broker config`; run it again after `fedfleet devices revoke`, then reload Mosquitto",
        f"listener {config.port} {config.bind}",
        f"cafile {out / 'ca.pem'}",
        f"certfile {cert}",
        f"keyfile {key}",
        f"crlfile {out / 'crl.pem'}",
        "require_certificate true",
        "use_identity_as_username true",
        # the client id is the certificate's name too: Mosquitto ends the older session of a client id that
        # connects again, so a device claiming another's id (or the coordinator's) used to disconnect it
        "use_username_as_clientid true",
        "tls_version tlsv1.2",
        "allow_anonymous false",
        f"acl_file {out / 'acl'}",
        f"max_packet_size {LIMITS.mqtt_telemetry_payload + 4096}",  # a larger packet disconnects its sender
        "persistence false",
        "max_queued_messages 100000",
        "log_dest stderr",
    ]
    if config.run_as:
        lines.append(f"user {config.run_as}")
    atomic_write_bytes(config.conf, ("\n".join(lines) + "\n").encode())
    for path in (out / "ca.pem", out / "crl.pem", out / "acl", config.conf, cert):
        path.chmod(0o644)  # the broker drops root; it must read these (the key stays 0600: set its owner)
    return [config.conf, out / "acl", out / "ca.pem", out / "crl.pem", cert, key]
