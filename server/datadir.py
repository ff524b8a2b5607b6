"""The coordinator's data directory: one place for the database, keys, update repository and trust bundle.

DATA/config.toml             coordinator settings (addresses, topic prefix)
DATA/fedfleet.db             SQLite (WAL)
DATA/keys/                   TUF role keys, the releases' delegation key and the director key (0600)
DATA/repository/             the TUF repository served to devices
DATA/trust/root.json         the root devices start from (enrollment bundle)
DATA/trust/director_keys.json
DATA/policy.toml             policy as code (optional; see server/policy.py)
DATA/trust/ca.pem, crl.pem   the fleet CA's trust bundle (root + issuing intermediate, whose key is keys/ca-key.pem)
                             and its revocation list (see server/trust/pki.py)
OFFLINE/                     with `fedfleet init --offline-keys OFFLINE`: the TUF root key (root.pem) and the root
                             CA key (ca-root-key.pem), kept off the coordinator; otherwise both are in DATA/keys/
DATA/tls/                    the coordinator's own certificates (gRPC server, MQTT client)
"""

from __future__ import annotations

import json
import secrets
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edge_agent.contract import DEFAULT_TOPIC_PREFIX
from edge_agent.contract.files import atomic_write_bytes
from server.errors import DataDirError
from server.policy import Policy, load_policy
from server.rollout.driver import Rollouts
from server.store import Store
from server.trust.director import Director
from server.trust.pki import CA_ROOT_KEY, COORDINATOR_IDENTITY, FleetCA
from server.trust.repository import Repository
from server.users import Users

__all__ = ["DEFAULT_DATA_DIR", "ENV_DATA_DIR", "CoordinatorConfig", "DataDir"]

ENV_DATA_DIR = "FEDFLEET_DATA_DIR"  # overrides DEFAULT_DATA_DIR for every command
DEFAULT_DATA_DIR = Path("fedfleet-data")


@dataclass(frozen=True)
class CoordinatorConfig:
    grpc_listen: str = "127.0.0.1:50051"
    mqtt_url: str = ""  # empty: start the embedded broker on embedded_broker_listen
    embedded_broker_listen: str = "127.0.0.1:1883"
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    tick_seconds: float = 0.2
    rollout_tick_seconds: float = 1.0  # how often rollouts are judged (pooling telemetry costs)
    policy: str = "policy.toml"  # relative to the data directory
    grpc_tls: bool = False  # mutual TLS on gRPC: devices present certificates from the fleet CA
    tls_hosts: tuple[str, ...] = ("127.0.0.1", "localhost")  # names in the gRPC server certificate
    epsilon_budget: float = 10.0  # each device's lifetime privacy budget (sum of ε over training runs)
    dashboard_listen: str = "127.0.0.1:8080"  # the dashboard, its API and /metrics; "" turns it off
    dashboard_public_read: bool = False  # read-only views without the operator token (actions always need it)
    freshness_hours: float = 24.0  # a device's freshness statement's validity; past it, the device says it is stale
    dashboard_tls: bool = False  # HTTPS with the fleet CA's certificate for tls_hosts (needed beyond loopback)
    mirror_dirs: tuple[str, ...] = ()  # static mirror directories serve re-syncs on every new timestamp

    def to_toml(self) -> str:
        return (
            "# fedfleet coordinator settings; `fedfleet serve` flags override them.\n"
            f'grpc_listen = "{self.grpc_listen}"\n'
            '# mqtt_url = "mqtt://127.0.0.1:1883"   # a real broker (Mosquitto); unset: embedded broker\n'
            f'mqtt_url = "{self.mqtt_url}"\n'
            f'embedded_broker_listen = "{self.embedded_broker_listen}"\n'
            f'topic_prefix = "{self.topic_prefix}"\n'
            f"tick_seconds = {self.tick_seconds}\n"
            f"rollout_tick_seconds = {self.rollout_tick_seconds}\n"
            "# policy as code: what may be released and rolled out (see server/policy.py); missing file: defaults\n"
            f'policy = "{self.policy}"\n'
            "# mutual TLS for gRPC (devices enrolled with `fedfleet devices enroll` carry certificates); for MQTT\n"
            "# use an mqtts:// mqtt_url to a broker configured by `fedfleet broker config`\n"
            f"grpc_tls = {str(self.grpc_tls).lower()}\n"
            f"tls_hosts = {json.dumps(list(self.tls_hosts))}\n"
            "# each device's lifetime privacy budget: the sum of ε over the training runs it took part in\n"
            f"epsilon_budget = {self.epsilon_budget}\n"
            '# the dashboard, its HTTP API and Prometheus /metrics (loopback by default; "" turns it off)\n'
            f'dashboard_listen = "{self.dashboard_listen}"\n'
            "# read-only views without the operator token (`fedfleet dashboard-token`); actions always need it\n"
            f"dashboard_public_read = {str(self.dashboard_public_read).lower()}\n"
            '# how long the director\'s per-device freshness statement ("your latest assignment is counter N") is\n'
            "# valid; a device without an unexpired one reports itself stale, and a device running another release\n"
            "# than assigned for longer is listed by `fedfleet devices behind` and alerted on\n"
            f"freshness_hours = {self.freshness_hours}\n"
            "# HTTPS for the dashboard with the fleet CA's certificate for tls_hosts; `serve --tls` turns on both TLS\n"
            "# settings. Plaintext is allowed on loopback only: serve refuses other addresses without TLS.\n"
            f"dashboard_tls = {str(self.dashboard_tls).lower()}\n"
            "# static mirrors of the update repository (`fedfleet mirror sync DIR`), re-synced by serve on every\n"
            "# new timestamp; relative paths are relative to the data directory\n"
            f"mirror_dirs = {json.dumps(list(self.mirror_dirs))}\n"
        )


def _check_offline_dir(offline: Path, data_root: Path) -> None:
    """The offline directory must be outside the data directory and hold no root keys yet (another fleet's)."""
    resolved, data = offline.resolve(), data_root.resolve()
    if resolved == data or data in resolved.parents:
        raise DataDirError(f"--offline-keys {offline} lies inside the data directory; give a removable drive's path")
    taken = [name for name in ("root.pem", CA_ROOT_KEY) if (offline / name).exists()]
    if taken:
        raise DataDirError(f"{offline} already holds {', '.join(taken)} (another fleet's?); give an empty directory")
    offline.mkdir(mode=0o700, parents=True, exist_ok=True)


class DataDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.config_path = root / "config.toml"
        self.db_path = root / "fedfleet.db"
        self.keys = root / "keys"
        self.repository_dir = root / "repository"
        self.trust = root / "trust"

    @property
    def initialised(self) -> bool:
        return self.config_path.is_file() and self.db_path.is_file() and (self.keys / "director.pem").is_file()

    @classmethod
    def init(cls, root: Path, offline_keys: Path | None = None) -> tuple[DataDir, bool]:
        """Create everything once. Returns (datadir, created); a second call changes nothing. With
        `offline_keys` the TUF root key and the root CA key are written there (a USB stick to unplug), not to
        DATA/keys: the online keys (targets, snapshot, timestamp, releases, director, the intermediate CA)
        run the fleet, and the commands that need an offline key take that directory again."""
        d = cls(root)
        if d.initialised:
            if offline_keys is not None and (d.keys / "root.pem").exists():
                raise DataDirError(
                    f"{root} is already initialised with its root keys online; --offline-keys applies when a data "
                    "directory is created"
                )
            return d, False
        if root.exists() and any(root.iterdir()) and not d.config_path.exists():
            raise DataDirError(f"{root} exists and is not a fedfleet data directory; choose an empty or new path")
        if offline_keys is not None:
            _check_offline_dir(offline_keys, root)
        root.mkdir(parents=True, exist_ok=True)
        d.keys.mkdir(mode=0o700, exist_ok=True)
        repo = Repository.create(d.repository_dir, d.keys, root_key_dir=offline_keys)
        FleetCA.create(d.keys, d.trust, root_key_dir=offline_keys)
        director = Director.create(d.keys / "director.pem")
        d.trust.mkdir(exist_ok=True)
        atomic_write_bytes(d.trust / "root.json", repo.first_root_bytes())
        atomic_write_bytes(d.trust / "director_keys.json", json.dumps(director.public_keys(), indent=1).encode())
        Store(d.db_path).close()
        atomic_write_bytes(d.config_path, CoordinatorConfig().to_toml().encode())  # last: marks completion
        return d, True

    def require(self) -> DataDir:
        if not self.initialised:
            raise DataDirError(
                f"{self.root} is not an initialised data directory; run `fedfleet init --data-dir {self.root}`"
            )
        return self

    def config(self) -> CoordinatorConfig:
        try:
            raw: dict[str, Any] = tomllib.loads(self.require().config_path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise DataDirError(f"{self.config_path} is not valid TOML: {e}") from e
        known = CoordinatorConfig.__dataclass_fields__
        unknown = set(raw) - set(known)
        if unknown:
            raise DataDirError(f"{self.config_path}: unknown setting(s) {', '.join(sorted(unknown))}")
        for key in ("tls_hosts", "mirror_dirs"):
            if key in raw:
                if not isinstance(raw[key], list):
                    raise DataDirError(f"{self.config_path}: {key} must be a list of strings")
                raw[key] = tuple(str(h) for h in raw[key])
        if not isinstance(raw.get("freshness_hours", 1.0), int | float) or not raw.get("freshness_hours", 1.0) > 0:
            raise DataDirError(f"{self.config_path}: freshness_hours must be a positive number of hours")
        return CoordinatorConfig(**raw)

    def set_config(self, key: str, text: str) -> CoordinatorConfig:
        """Change one setting in config.toml from its text form (true/false, a number, a string, or a comma-
        separated list for tls_hosts); a bad key or value raises DataDirError and changes nothing."""
        current = self.config()
        fields = CoordinatorConfig.__dataclass_fields__
        if key not in fields:
            raise DataDirError(f"unknown setting {key!r}; the settings are: {', '.join(fields)}")
        default = getattr(CoordinatorConfig(), key)
        value: Any
        if isinstance(default, bool):
            if text not in ("true", "false"):
                raise DataDirError(f"{key} must be true or false, not {text!r}")
            value = text == "true"
        elif isinstance(default, float):
            try:
                value = float(text)
            except ValueError:
                raise DataDirError(f"{key} must be a number, not {text!r}") from None
            if not value > 0:
                raise DataDirError(f"{key} must be positive")
        elif isinstance(default, tuple):
            value = tuple(h.strip() for h in text.split(",") if h.strip())
            if not value and key != "mirror_dirs":
                raise DataDirError(f"{key} needs at least one entry (comma-separated)")
        else:
            value = text
        changed = replace(current, **{key: value})
        atomic_write_bytes(self.config_path, changed.to_toml().encode())
        self.config()  # what was written reads back
        return changed

    def store(self) -> Store:
        return Store(self.require().db_path)

    def repository(self) -> Repository:
        return Repository(self.require().repository_dir, self.keys)

    def director(self) -> Director:
        return Director.load(self.require().keys / "director.pem", self.config().freshness_hours * 3600)

    def ca(self) -> FleetCA:
        return FleetCA.open(self.require().keys, self.trust)

    def tls_files(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) paths of one of the coordinator's own TLS identities under DATA/tls/."""
        return self.root / "tls" / f"{name}.pem", self.root / "tls" / f"{name}-key.pem"

    def ensure_coordinator_tls(self, store: Store) -> None:
        """Issue the coordinator's gRPC server certificate (for tls_hosts) and its MQTT client certificate,
        once each; a changed tls_hosts issues a new server certificate."""
        ca = self.ca()
        ca.ensure_files(
            store, COORDINATOR_IDENTITY, "grpc-server", self.config().tls_hosts, *self.tls_files("grpc-server")
        )
        ca.ensure_files(store, COORDINATOR_IDENTITY, "coordinator", (), *self.tls_files("coordinator"))

    def operator_token(self, rotate: bool = False) -> str:
        """The operator token (keys/operator.token, created on first use; `rotate`: a new one), held by the admin
        user `operator`: it keeps working for set-ups from before users and roles."""
        path = self.require().keys / "operator.token"
        if rotate or not path.is_file():
            atomic_write_bytes(path, secrets.token_urlsafe(32).encode())  # mkstemp: 0600
        token = path.read_text().strip()
        with self.store() as store:  # the token signs in as the admin user `operator` (server/users.py)
            Users(store).adopt_operator(token, rotated=rotate)
        return token

    def users(self, store: Store) -> Users:
        """The users of this data directory, the `operator` admin among them once its token exists."""
        path = self.keys / "operator.token"
        users = Users(store)
        if path.is_file():
            users.adopt_operator(path.read_text().strip())
        return users

    def policy(self) -> Policy:
        return load_policy(self.root / self.config().policy)

    def rollouts(self, store: Store) -> Rollouts:
        return Rollouts(store, self.director(), self.policy())
