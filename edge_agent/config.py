"""The agent's configuration file (TOML), as written into an enrollment bundle by `fedfleet devices enroll`.

device_id = "pi-kitchen-01"
fleet = "default"
state_dir = "/var/lib/fedfleet-agent"     # relative paths are relative to this file
grpc_target = "coordinator.lan:50051"
mqtt_url = "mqtts://coordinator.lan:8883"
trust_root = "root.json"                  # the TUF root the device starts from
director_keys = "director_keys.json"      # {key_id: Ed25519 public key hex}
topic_prefix = "fedfleet/v1"
grpc_tls = true                           # mutual TLS to the coordinator's gRPC (mqtts:// does it for MQTT)
tls_ca = "ca.pem"                         # the fleet CA; the device's certificate and key:
tls_cert = "device.pem"
tls_key = "device-key.pem"
# allow_plaintext = false                 # lab only: plaintext gRPC/MQTT to a coordinator beyond loopback
# mirrors = ["https://mirror.lan/fedfleet/"]   # static TUF mirrors, tried in order before the coordinator's gRPC
# mirror_ca = "ca.pem"                    # what verifies the mirrors' certificates: default tls_ca; "system": the
#                                         # system's trust store (a public CDN)
[labels]
site = "kitchen"
[consent]                                 # the device owner's choices, reported when the agent registers
training = false                          # train on this device's data (federated rounds); absent: no consent
[telemetry]                               # differential privacy on telemetry windows (absent: exact counts)
dp_epsilon_per_window = 1.0               # Laplace noise for this ε on every window; windows then close on time
#                                         # only (every telemetry_every_seconds, empty ones too) and each costs ε
monitoring_budget_epsilon = 10.0          # the device's lifetime ε for noised windows (default 10); spent in
#                                         # state_dir/monitoring.json, and when what is left is less than one
#                                         # window's ε, windows stop and the last one says so
# xnnpack = true                          # the interpreter's default XNNPACK delegate: faster inference, but it
#                                         # repacks the weights into memory of its own (about the model's size);
#                                         # false: builtin kernels on the mapped file (less memory, slower)
# share_models = false                    # simulated fleets only: the agents of one process that load the same
#                                         # bytes (same sha256) share one interpreter (edge_agent/runtime.py)
"""

from __future__ import annotations

import json
import logging
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge_agent.contract import DEFAULT_TOPIC_PREFIX, LIMITS, device_id_is_valid
from edge_agent.contract.addresses import is_loopback, parse_mqtt_url
from edge_agent.errors import ConfigError
from edge_agent.runtime import ModelOptions
from edge_agent.steps import STEPS

__all__ = ["DEFAULT_MONITORING_BUDGET", "AgentConfig", "TlsFiles", "load_config"]

logger = logging.getLogger(__name__)

_INTERPRETERS = ("ai-edge-litert", "tflite-runtime")
DEFAULT_MONITORING_BUDGET = 10.0
_MAX_MIRRORS = 8


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    state_dir: Path
    grpc_target: str
    mqtt_host: str
    mqtt_port: int
    trust_root: Path
    director_keys: dict[str, str]
    fleet: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    interpreter: str | None = None  # None: ai-edge-litert if installed, else tflite-runtime
    retry_seconds: float = 2.0  # first back-off after a transient failure (doubles up to 60 s)
    debug_pause_at: str | None = None  # fault injection: stop at this update step (tests only)
    telemetry_every_inferences: int = 500  # a window closes after this many inferences ...
    telemetry_every_seconds: float = 60.0  # ... or this many seconds, whichever comes first
    outbox_cap: int = 5000  # windows kept unconfirmed before the oldest unsent ones are summarized
    bulk_upload_after: int = 20  # a backlog this long goes over gRPC in one stream instead of MQTT
    ack_timeout: float = 15.0  # windows sent over MQTT but unconfirmed this long go again over gRPC
    local_endpoint: str = ""  # where applications call Infer: "unix:PATH" or "127.0.0.1:PORT"; "": state dir; "off"
    mqtt_tls: bool = False  # mqtts:// in the config
    grpc_tls: bool = False
    tls: TlsFiles | None = None  # needed by mqtts:// and grpc_tls
    allow_plaintext: bool = False  # lab only: plaintext to a coordinator or broker beyond loopback
    mirrors: tuple[str, ...] = ()  # static TUF mirrors' base URLs (ending in "/"), tried before the coordinator
    mirror_ca: Path | None = None  # the CA file that verifies the mirrors' certificates; None: the system's store
    consent_training: bool | None = None  # [consent] training; None: the owner stated nothing (no consent)
    dp_epsilon_per_window: float | None = None  # [telemetry]: Laplace noise for this ε per window; None: exact counts
    monitoring_budget_epsilon: float = DEFAULT_MONITORING_BUDGET  # [telemetry]: lifetime ε for noised windows
    xnnpack: bool = True  # load models with the interpreter's default XNNPACK delegate (faster, more memory)
    share_models: bool = False  # simulated fleets: one interpreter per distinct model bytes in this process

    @property
    def model_options(self) -> ModelOptions:
        return ModelOptions(xnnpack=self.xnnpack, share=self.share_models)


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(CA, certificate, key) bytes; a missing or unreadable file is a ConfigError naming it."""
        out = []
        for path in (self.ca, self.cert, self.key):
            try:
                out.append(path.read_bytes())
            except OSError as e:
                raise ConfigError(f"TLS file {path} unreadable: {e.strerror}") from e
        return out[0], out[1], out[2]


def _mqtt_address(url: str) -> tuple[str, int, bool]:
    try:
        return parse_mqtt_url(url)
    except ValueError as e:
        raise ConfigError(f"mqtt_url: {e}") from e


def load_config(path: Path) -> AgentConfig:
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} not found; it comes with the device's enrollment bundle") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    return config_from_dict(raw, path.parent)


def config_from_dict(raw: dict[str, Any], base: Path) -> AgentConfig:
    missing = [
        k for k in ("device_id", "state_dir", "grpc_target", "mqtt_url", "trust_root", "director_keys") if k not in raw
    ]
    if missing:
        raise ConfigError(f"config lacks {', '.join(missing)}")
    device_id = str(raw["device_id"])
    if not device_id_is_valid(device_id):
        raise ConfigError(f"device_id {device_id!r} must be 1-{LIMITS.id_length} of letters, digits, '-', '_', '.'")
    fleet = str(raw.get("fleet", "default"))
    if not device_id_is_valid(fleet):
        raise ConfigError(f"fleet {fleet!r} must be letters, digits, '-', '_', '.'")
    labels = raw.get("labels", {})
    if not isinstance(labels, dict) or len(labels) > LIMITS.labels:
        raise ConfigError(f"labels must be a table of at most {LIMITS.labels} entries")
    interpreter = raw.get("interpreter")
    if interpreter is not None and interpreter not in _INTERPRETERS:
        raise ConfigError(f"interpreter must be one of {', '.join(_INTERPRETERS)}")
    pause = raw.get("debug_pause_at")
    if pause is not None and pause not in STEPS:
        raise ConfigError(f"debug_pause_at must be one of {', '.join(STEPS)}")
    keys_path = base / str(raw["director_keys"])
    try:
        director_keys = json.loads(keys_path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"director keys {keys_path} unreadable: {e}") from e
    if not isinstance(director_keys, dict):
        raise ConfigError(f"director keys {keys_path} must be a JSON object of key id to public key hex")
    host, port, mqtt_tls = _mqtt_address(str(raw["mqtt_url"]))
    grpc_tls = raw.get("grpc_tls", False)
    if not isinstance(grpc_tls, bool):
        raise ConfigError("grpc_tls must be true or false")
    tls_keys = ("tls_ca", "tls_cert", "tls_key")
    given = [k for k in tls_keys if raw.get(k)]
    if given and len(given) != 3:
        raise ConfigError("give all of tls_ca, tls_cert and tls_key, or none")
    tls = TlsFiles(*(base / str(raw[k]) for k in tls_keys)) if given else None
    if (mqtt_tls or grpc_tls) and tls is None:
        raise ConfigError("mqtts:// and grpc_tls need tls_ca, tls_cert and tls_key (they come with the bundle)")
    allow_plaintext = raw.get("allow_plaintext", False)
    if not isinstance(allow_plaintext, bool):
        raise ConfigError("allow_plaintext must be true or false")
    xnnpack = raw.get("xnnpack", True)
    if not isinstance(xnnpack, bool):
        raise ConfigError(f"xnnpack must be true (faster inference) or false (less memory); got {xnnpack!r}")
    share_models = raw.get("share_models", False)
    if not isinstance(share_models, bool):
        raise ConfigError(f"share_models must be true or false (true only for simulated fleets); got {share_models!r}")
    consent = raw.get("consent", {})
    if not isinstance(consent, dict) or set(consent) - {"training"}:
        raise ConfigError("[consent] is a table with one setting: training = true or false")
    consent_training = consent.get("training")
    if consent_training is not None and not isinstance(consent_training, bool):
        raise ConfigError("[consent] training must be true or false")
    dp_epsilon, budget = _telemetry_privacy(raw.get("telemetry", {}))
    grpc_target = str(raw["grpc_target"])
    plaintext = [
        what
        for what, tls_on, address_host in (
            (f"gRPC to {grpc_target}", grpc_tls, grpc_target.rpartition(":")[0]),
            (f"MQTT to {host}:{port}", mqtt_tls, host),
        )
        if not tls_on and not is_loopback(address_host)
    ]
    if plaintext and not allow_plaintext:
        raise ConfigError(
            f"{' and '.join(plaintext)} would be plaintext beyond this machine: enroll with TLS (grpc_tls = true, "
            "an mqtts:// mqtt_url) or, in a lab, set allow_plaintext = true"
        )
    for what in plaintext:
        logger.warning("%s is plaintext beyond this machine (allow_plaintext = true)", what)
    mirrors = _mirrors(raw.get("mirrors", []), allow_plaintext)
    mirror_ca = _mirror_ca(raw.get("mirror_ca"), base, tls)
    return AgentConfig(
        device_id=device_id,
        fleet=fleet,
        state_dir=base / str(raw["state_dir"]),
        grpc_target=grpc_target,
        mqtt_host=host,
        mqtt_port=port,
        trust_root=base / str(raw["trust_root"]),
        director_keys={str(k): str(v) for k, v in director_keys.items()},
        labels={str(k): str(v) for k, v in labels.items()},
        topic_prefix=str(raw.get("topic_prefix", DEFAULT_TOPIC_PREFIX)),
        interpreter=interpreter,
        retry_seconds=float(raw.get("retry_seconds", 2.0)),
        debug_pause_at=pause,
        telemetry_every_inferences=_positive(raw, "telemetry_every_inferences", 500),
        telemetry_every_seconds=float(_positive(raw, "telemetry_every_seconds", 60.0)),
        outbox_cap=_outbox_cap(raw),
        bulk_upload_after=_positive(raw, "bulk_upload_after", 20),
        ack_timeout=float(_positive(raw, "ack_timeout", 15.0)),
        local_endpoint=_local_endpoint(str(raw.get("local_endpoint", "")), base / str(raw["state_dir"])),
        mqtt_tls=mqtt_tls,
        grpc_tls=grpc_tls,
        tls=tls,
        allow_plaintext=allow_plaintext,
        consent_training=consent_training,
        mirrors=mirrors,
        mirror_ca=mirror_ca,
        dp_epsilon_per_window=dp_epsilon,
        monitoring_budget_epsilon=budget,
        xnnpack=xnnpack,
        share_models=share_models,
    )


def _telemetry_privacy(table: Any) -> tuple[float | None, float]:
    """[telemetry]: (ε per window or None, the monitoring budget)."""
    keys = {"dp_epsilon_per_window", "monitoring_budget_epsilon"}
    if not isinstance(table, dict) or set(table) - keys:
        raise ConfigError("[telemetry] is a table with two settings: dp_epsilon_per_window, monitoring_budget_epsilon")

    def number(key: str) -> float | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"[telemetry] {key} must be a positive number (ε), like 1.0; got {value!r}")
        return float(value)

    epsilon = number("dp_epsilon_per_window")
    budget = number("monitoring_budget_epsilon")
    budget = DEFAULT_MONITORING_BUDGET if budget is None else budget
    if epsilon is not None and epsilon > budget:
        raise ConfigError(
            f"[telemetry] dp_epsilon_per_window {epsilon:g} exceeds monitoring_budget_epsilon {budget:g}: no window "
            "could ever be sent; lower the one or raise the other"
        )
    return epsilon, budget


def _mirrors(value: Any, allow_plaintext: bool) -> tuple[str, ...]:
    """Mirror base URLs: https://, or http:// on loopback (beyond it only with allow_plaintext). A mirror is
    untrusted (every byte is verified), but TLS keeps a release's bytes from onlookers and a path from tampering
    that would cost the device a fallback."""
    if not isinstance(value, list) or not all(isinstance(u, str) for u in value) or len(value) > _MAX_MIRRORS:
        raise ConfigError(f'mirrors must be a list of at most {_MAX_MIRRORS} URLs, like ["https://mirror.lan/repo/"]')
    out = []
    for url in value:
        parsed = urlsplit(url)
        if parsed.scheme not in ("https", "http") or not parsed.hostname or parsed.query or parsed.fragment:
            raise ConfigError(f"mirror {url!r} must be an https:// URL of the mirror's root, without query")
        if parsed.scheme == "http" and not is_loopback(parsed.hostname):
            if not allow_plaintext:
                raise ConfigError(
                    f"mirror {url!r} would be plaintext beyond this machine: use https:// or, in a lab, set "
                    "allow_plaintext = true"
                )
            logger.warning("mirror %s is plaintext beyond this machine (allow_plaintext = true)", url)
        out.append(url if url.endswith("/") else url + "/")
    return tuple(out)


def _mirror_ca(value: Any, base: Path, tls: TlsFiles | None) -> Path | None:
    if value is None:
        return tls.ca if tls is not None else None
    if not isinstance(value, str) or not value:
        raise ConfigError('mirror_ca must be a CA file\'s path or "system"')
    if value == "system":
        return None
    if not (base / value).is_file():
        raise ConfigError(f"mirror_ca {base / value} is not a file; give the CA that issued the mirrors' certificates")
    return base / value


def _local_endpoint(value: str, state_dir: Path) -> str:
    if not value:
        return f"unix:{(state_dir / 'agent.sock').resolve()}"
    if value == "off" or value.startswith("unix:"):
        return value
    host = value.rpartition(":")[0]
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        raise ConfigError("local_endpoint must be unix:PATH or a loopback host:port; it serves this device only")
    return value


def _outbox_cap(raw: dict[str, Any]) -> int:
    cap = int(_positive(raw, "outbox_cap", 5000))
    if not 2 <= cap <= LIMITS.outbox_cap:
        raise ConfigError(f"outbox_cap must be between 2 and {LIMITS.outbox_cap} windows")
    return cap


def _positive(raw: dict[str, Any], key: str, default: Any) -> Any:
    value = raw.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key} must be a positive number")
    return type(default)(value)
