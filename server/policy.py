"""Policy as code: `policy.toml` in the data directory (path set by `policy` in config.toml) says what may be
released and rolled out at all. A release or rollout that breaks it is refused before anything reaches a device,
with every broken rule named. No file: the built-in defaults below, which refuse nothing a release could carry.

    [release]
    max_epsilon = 8.0                          # the model card's privacy.epsilon must be at or below this
    required_card_fields = ["intended_use", "privacy.epsilon"]   # dotted paths into the model card
    max_model_bytes = 5_000_000

    [rollout]
    min_canary = 2
    required_gates = ["class_mix_shift", "failure_rate"]         # metrics every rollout must gate on
    default_gates = ["input_max_psi<=0.2", "class_mix_shift<=0.2"]  # used when a rollout names none
    allowed_signers = ["<director key id>"]    # director keys allowed to sign assignments; empty: any

    [retrain]                                  # what fleet-wide drift on the running release leads to
    on_drift = "retrain"                       # off | alert | review (alert + a proposal a person approves)
                                               # | retrain (train, release, roll out at once)
    metric = "input_max_psi"                   # input_max_psi | input_mean_psi | score_psi
    threshold = 0.25
    window_seconds = 30                        # telemetry pooled over this much of the recent past
    min_devices = 2                            # devices that must have reported in the window
    min_samples_per_bin = 30                   # evidence: pooled inferences per feature bin before any verdict
    cooldown_seconds = 600                     # after an alarm resolves, none for the same release this long
    engine = "simulation"                      # Flower's engine for the retraining run: simulation (virtual
                                               # clients on this machine) or deployment (the devices' SuperNodes)
    superlink = "127.0.0.1:9093"               # deployment: the SuperLink's Control API address (`flwr run`)
    superlink_root_certificates = ""           # deployment: its CA certificate (PEM); "" (plaintext) only on
                                               # loopback
    clients = 0                                # deployment: SuperNodes a round waits for; 0: the fleet's size
    rounds = 3                                 # the retraining run's rounds and per-device target ε
    target_epsilon = 3.0
    exact_reference = false                    # lab only: the drift reference from exact counts of devices that
                                               # allow it (not private; on a handful of devices DP noise drowns it)
    data_source = ""                           # "module:callable" giving each simulated client's data; "":
                                               # each device's digits share
    rollout_spec = ""                          # a rollout spec file (see server/rollout/spec.py) for the
                                               # retrained release; "": defaults and the policy's default gates

    [consent]
    require_consent = true                     # train only on devices whose recorded consent says yes (agent.toml
                                               # [consent] training, reported at registration); false: devices
                                               # that stated nothing take part too. A "no" is always honoured.

    [data_quality]                             # checks against each release's input schema, on the device
    stale_after_seconds = 3600                 # a device with no inference this long has stale data
    max_invalid_input_rate = 0.01              # alert when a fleet's inputs break the schema more often

    [alerts]
    privacy_budget_fraction = 0.8              # alert when a device has spent this much of its lifetime ε
    silent_after_seconds = 600                 # alert when devices of a fleet have not been heard this long
    [[alerts.webhooks]]                        # each alert opened or resolved is POSTed here as JSON
    url = "https://hooks.example.org/fedfleet" # http:// only to a loopback address
    events = ["drift_alarm", "training_failed"]   # alert kinds; empty or absent: every kind
    secret_env = "FEDFLEET_WEBHOOK_SECRET"     # or secret = "..."; signs the body (X-Fedfleet-Signature)
    max_attempts = 6                           # retried with exponential backoff and jitter

    [retention]                                # how long `fedfleet serve` keeps what devices and training send;
    telemetry_days = 30                        # 0: keep forever. Never pruned: the audit trail, the privacy
    events_days = 90                           # ledger, and what a live rollout's gates or a running training
    incidents_days = 180                       # read (see server/store/retention.py)
    interval_seconds = 3600                    # how often serve prunes
    batch_rows = 500                           # rows per transaction (a short write lock each)

    [audit]
    anchor_seconds = 3600                      # serve signs and exports the audit head this often (0: never);
                                               # see server/audit.py (DATA/audit-anchors/, webhooks wanting all)

The evidence default comes from benchmarks/drift_false_alarms.py (64 features, 10 bins each, no drift at all):
P(max PSI > 0.25) is 0.43 at 10 samples per bin, 0.01 at 15, 0.001 at 20 and 0 in 5000 trials at 30.
"""

from __future__ import annotations

import contextlib
import math
import os
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.contract import LIMITS
from edge_agent.contract.addresses import is_loopback
from server.errors import CoordinatorError
from server.loop.kinds import AlertKind
from server.rollout.metrics import METRICS, SCORE_METRICS
from server.rollout.spec import Gate, RolloutSpec, RolloutSpecError, parse_gate

__all__ = [
    "DRIFT_METRICS",
    "RETRAIN_ACTIONS",
    "Policy",
    "PolicyError",
    "PolicyViolation",
    "Retention",
    "Webhook",
    "load_policy",
]


class PolicyError(CoordinatorError):
    """policy.toml itself is malformed."""


class PolicyViolation(CoordinatorError):
    """What was asked breaks the policy; `rules` names every broken rule."""

    def __init__(self, what: str, rules: list[str], source: str) -> None:
        self.rules = rules
        super().__init__(f"{what} refused by policy ({source}): " + "; ".join(rules))


@dataclass(frozen=True)
class Webhook:
    url: str
    secret: str = field(repr=False)
    events: tuple[str, ...] = ()  # alert kinds; empty: every kind
    max_attempts: int = 6

    def wants(self, kind: str) -> bool:
        return not self.events or kind in self.events


@dataclass(frozen=True)
class Retention:
    """Days each kind of record is kept (0: forever), and how serve prunes: every `interval_seconds`, at most
    `batch_rows` rows per transaction."""

    telemetry_days: float = 30.0
    events_days: float = 90.0
    incidents_days: float = 180.0
    interval_seconds: float = 3600.0
    batch_rows: int = 500


@dataclass(frozen=True)
class Policy:
    source: str = "built-in defaults"
    max_epsilon: float | None = None
    required_card_fields: tuple[str, ...] = ()
    max_model_bytes: int = LIMITS.target_file
    min_canary: int = 1
    required_gates: tuple[str, ...] = ()
    default_gates: tuple[Gate, ...] | None = None
    allowed_signers: tuple[str, ...] = ()
    retrain_on_drift: str = "off"
    retrain_metric: str = "input_max_psi"
    retrain_threshold: float = 0.25
    retrain_window_seconds: float = 30.0
    retrain_min_devices: int = 2
    retrain_min_samples_per_bin: int = 30
    retrain_cooldown_seconds: float = 600.0
    retrain_engine: str = "simulation"
    retrain_superlink: str = ""
    retrain_superlink_root_certificates: str = ""
    retrain_clients: int = 0
    retrain_rounds: int = 3
    retrain_target_epsilon: float = 3.0
    retrain_exact_reference: bool = False
    retrain_data_source: str = ""
    retrain_rollout_spec: str = ""
    require_consent: bool = False
    data_stale_after_seconds: float = 3600.0
    data_max_invalid_input_rate: float = 0.01
    alerts_privacy_budget_fraction: float = 0.8
    alerts_silent_after_seconds: float = 600.0
    webhooks: tuple[Webhook, ...] = ()
    retention: Retention = Retention()
    audit_anchor_seconds: float = 3600.0

    def release_violations(self, length: int, custom: Mapping[str, Any]) -> list[str]:
        rules: list[str] = []
        card = custom.get("model_card") or {}
        if length > self.max_model_bytes:
            rules.append(f"max_model_bytes: the model is {length} bytes, the limit {self.max_model_bytes}")
        for path in self.required_card_fields:
            if _lookup(card, path) in (None, "", [], {}):
                rules.append(f"required_card_fields: the model card has no {path!r}")
        if self.max_epsilon is not None:
            eps = _lookup(card, "privacy.epsilon")
            if isinstance(eps, str):  # signed metadata carries numbers as decimal strings (canonical JSON)
                with contextlib.suppress(ValueError):
                    eps = float(eps)
            if not isinstance(eps, int | float) or isinstance(eps, bool):
                rules.append("max_epsilon: the model card states no privacy.epsilon (a number)")
            elif not (math.isfinite(eps) and eps <= self.max_epsilon):
                rules.append(f"max_epsilon: ε = {eps} exceeds {self.max_epsilon}")
        return rules

    def rollout_violations(self, spec: RolloutSpec, signer_key_id: str) -> list[str]:
        rules: list[str] = []
        if spec.canary < self.min_canary:
            rules.append(f"min_canary: the canary has {spec.canary} device(s), the policy asks for {self.min_canary}")
        gated = {g.metric for g in spec.gates}
        for metric in self.required_gates:
            if metric not in gated:
                rules.append(f"required_gates: the rollout does not gate on {metric}")
        if self.allowed_signers and signer_key_id not in self.allowed_signers:
            rules.append(f"allowed_signers: director key {signer_key_id[:16]}… is not an allowed signer")
        return rules


def _lookup(doc: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(doc, Mapping) or part not in doc:
            return None
        doc = doc[part]
    return doc


_SECTIONS = {
    "release": {"max_epsilon", "required_card_fields", "max_model_bytes"},
    "rollout": {"min_canary", "required_gates", "default_gates", "allowed_signers"},
    "retrain": {
        "on_drift",
        "metric",
        "threshold",
        "window_seconds",
        "min_devices",
        "min_samples_per_bin",
        "cooldown_seconds",
        "engine",
        "superlink",
        "superlink_root_certificates",
        "clients",
        "rounds",
        "target_epsilon",
        "exact_reference",
        "data_source",
        "rollout_spec",
    },
    "consent": {"require_consent"},
    "data_quality": {"stale_after_seconds", "max_invalid_input_rate"},
    "alerts": {"privacy_budget_fraction", "silent_after_seconds", "webhooks"},
    "retention": {"telemetry_days", "events_days", "incidents_days", "interval_seconds", "batch_rows"},
    "audit": {"anchor_seconds"},
}
_WEBHOOK_KEYS = {"url", "events", "secret", "secret_env", "max_attempts"}
RETRAIN_ACTIONS = ("off", "alert", "review", "retrain")
# Engines `fedfleet serve` retrains on: Flower's simulation engine on this machine, or its deployment engine (a
# SuperLink given by address, the devices' SuperNodes), to which the retrain worker submits the run.
RETRAIN_ENGINES = ("simulation", "deployment")
DRIFT_METRICS = SCORE_METRICS  # what a fleet's pooled telemetry against its release's reference gives


def _bool(table: Mapping[str, Any], key: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false")
    return value


def load_policy(path: Path) -> Policy:
    if not path.exists():
        return Policy()
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise PolicyError(f"policy {path} cannot be read: {e}") from e
    problems = [f"unknown section [{s}]" for s in doc if s not in _SECTIONS]
    for section, keys in _SECTIONS.items():
        table = doc.get(section, {})
        if not isinstance(table, dict):
            problems.append(f"[{section}] must be a table")
            continue
        problems += [f"unknown setting {section}.{k}" for k in table if k not in keys]
    if problems:
        raise PolicyError(f"policy {path}: " + "; ".join(problems))
    release, rollout, retrain = doc.get("release", {}), doc.get("rollout", {}), doc.get("retrain", {})
    alerts = doc.get("alerts", {})
    consent, quality = doc.get("consent", {}), doc.get("data_quality", {})
    try:
        on_drift, drift_metric = str(retrain.get("on_drift", "off")), str(retrain.get("metric", "input_max_psi"))
        if on_drift not in RETRAIN_ACTIONS or drift_metric not in DRIFT_METRICS:
            raise PolicyError(
                f"policy {path}: retrain.on_drift must be one of {', '.join(RETRAIN_ACTIONS)} and retrain.metric "
                f"one of {', '.join(DRIFT_METRICS)}"
            )
        required_gates = tuple(str(m) for m in rollout.get("required_gates", ()))
        unknown = [m for m in required_gates if m not in METRICS]
        if unknown:
            raise PolicyError(f"policy {path}: rollout.required_gates names unknown metric(s) {', '.join(unknown)}")
        gates = rollout.get("default_gates")
        engine = str(retrain.get("engine", "simulation"))
        if engine not in RETRAIN_ENGINES:
            raise PolicyError(f"policy {path}: retrain.engine must be one of {', '.join(RETRAIN_ENGINES)}")
        superlink = str(retrain.get("superlink", ""))
        root_certificates = str(retrain.get("superlink_root_certificates", ""))
        if engine == "deployment":
            if not superlink:
                raise PolicyError(f"policy {path}: retrain.engine = 'deployment' needs retrain.superlink (host:port)")
            if not root_certificates and not is_loopback(superlink.rpartition(":")[0]):
                raise PolicyError(
                    f"policy {path}: the SuperLink {superlink} is not on loopback: give its CA certificate as "
                    "retrain.superlink_root_certificates (plaintext only on loopback)"
                )
        numbers = {
            "retrain.threshold": float(retrain.get("threshold", 0.25)),
            "retrain.window_seconds": float(retrain.get("window_seconds", 30.0)),
            "retrain.cooldown_seconds": float(retrain.get("cooldown_seconds", 600.0)),
            "retrain.target_epsilon": float(retrain.get("target_epsilon", 3.0)),
            "alerts.silent_after_seconds": float(alerts.get("silent_after_seconds", 600.0)),
            "data_quality.stale_after_seconds": float(quality.get("stale_after_seconds", 3600.0)),
        }
        bad = [k for k, v in numbers.items() if not (math.isfinite(v) and v >= 0)]
        fraction = float(alerts.get("privacy_budget_fraction", 0.8))
        if not 0 < fraction <= 1:
            bad.append("alerts.privacy_budget_fraction (a fraction in (0, 1])")
        invalid_rate = float(quality.get("max_invalid_input_rate", 0.01))
        if not 0 <= invalid_rate <= 1:
            bad.append("data_quality.max_invalid_input_rate (a fraction in [0, 1])")
        for name, value in (
            ("retrain.min_devices", retrain.get("min_devices", 2)),
            ("retrain.min_samples_per_bin", retrain.get("min_samples_per_bin", 30)),
            ("retrain.rounds", retrain.get("rounds", 3)),
            ("retrain.clients", retrain.get("clients", 0) or 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad.append(f"{name} (a whole number of at least 1)")
        if bad:
            raise PolicyError(f"policy {path}: these settings must be non-negative numbers: {', '.join(bad)}")
        policy = Policy(
            source=str(path),
            max_epsilon=None if release.get("max_epsilon") is None else float(release["max_epsilon"]),
            required_card_fields=tuple(str(f) for f in release.get("required_card_fields", ())),
            max_model_bytes=int(release.get("max_model_bytes", LIMITS.target_file)),
            min_canary=int(rollout.get("min_canary", 1)),
            required_gates=required_gates,
            default_gates=None if gates is None else tuple(parse_gate(str(g)) for g in gates),
            allowed_signers=tuple(str(k) for k in rollout.get("allowed_signers", ())),
            retrain_on_drift=on_drift,
            retrain_metric=drift_metric,
            retrain_threshold=numbers["retrain.threshold"],
            retrain_window_seconds=numbers["retrain.window_seconds"],
            retrain_min_devices=int(retrain.get("min_devices", 2)),
            retrain_min_samples_per_bin=int(retrain.get("min_samples_per_bin", 30)),
            retrain_cooldown_seconds=numbers["retrain.cooldown_seconds"],
            retrain_engine=engine,
            retrain_superlink=superlink,
            retrain_superlink_root_certificates=root_certificates,
            retrain_clients=int(retrain.get("clients", 0)),
            retrain_rounds=int(retrain.get("rounds", 3)),
            retrain_target_epsilon=numbers["retrain.target_epsilon"],
            retrain_exact_reference=_bool(retrain, "exact_reference"),
            retrain_data_source=str(retrain.get("data_source", "")),
            retrain_rollout_spec=str(retrain.get("rollout_spec", "")),
            require_consent=_bool(consent, "require_consent"),
            data_stale_after_seconds=numbers["data_quality.stale_after_seconds"],
            data_max_invalid_input_rate=invalid_rate,
            alerts_privacy_budget_fraction=fraction,
            alerts_silent_after_seconds=numbers["alerts.silent_after_seconds"],
            webhooks=tuple(_webhook(path, i, w) for i, w in enumerate(alerts.get("webhooks", ()))),
            retention=_retention(path, doc.get("retention", {})),
            audit_anchor_seconds=_seconds(path, "audit.anchor_seconds", doc.get("audit", {}), "anchor_seconds", 3600),
        )
    except (TypeError, ValueError, RolloutSpecError) as e:
        raise PolicyError(f"policy {path}: {e}") from e
    return policy


def _seconds(path: Path, name: str, table: Mapping[str, Any], key: str, default: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value >= 0):
        raise PolicyError(f"policy {path}: {name} must be a non-negative number, not {value!r}")
    return float(value)


def _retention(path: Path, table: Mapping[str, Any]) -> Retention:
    days = {
        k: _seconds(path, f"retention.{k}", table, k, d)
        for k, d in (("telemetry_days", 30), ("events_days", 90), ("incidents_days", 180))
    }
    interval = _seconds(path, "retention.interval_seconds", table, "interval_seconds", 3600)
    if interval < 1:
        raise PolicyError(f"policy {path}: retention.interval_seconds must be at least 1")
    batch = table.get("batch_rows", 500)
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 10_000:
        raise PolicyError(f"policy {path}: retention.batch_rows must be a whole number from 1 to 10000")
    return Retention(days["telemetry_days"], days["events_days"], days["incidents_days"], interval, batch)


def _webhook(path: Path, index: int, doc: Any) -> Webhook:
    where = f"policy {path}: alerts.webhooks[{index}]"
    if not isinstance(doc, dict):
        raise PolicyError(f"{where} must be a table")
    unknown = set(doc) - _WEBHOOK_KEYS
    if unknown:
        raise PolicyError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
    url = str(doc.get("url", ""))
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise PolicyError(f"{where}: url {url!r} must be an http(s) URL")
    if parsed.scheme == "http" and not is_loopback(parsed.hostname):
        raise PolicyError(f"{where}: alerts leave this machine only over https (plain http only to loopback)")
    if ("secret" in doc) == ("secret_env" in doc):
        raise PolicyError(f"{where}: give exactly one of secret and secret_env (the HMAC key that signs each body)")
    secret = str(doc["secret"]) if "secret" in doc else os.environ.get(str(doc["secret_env"]), "")
    if not secret:
        raise PolicyError(f"{where}: the secret is empty (is ${doc.get('secret_env')} set for fedfleet serve?)")
    events = doc.get("events", [])
    kinds = [str(k) for k in AlertKind]
    if not isinstance(events, list) or not all(isinstance(e, str) and e in kinds for e in events):
        raise PolicyError(f"{where}: events must be a list of alert kinds ({', '.join(kinds)})")
    attempts = doc.get("max_attempts", 6)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 20:
        raise PolicyError(f"{where}: max_attempts must be a whole number from 1 to 20")
    return Webhook(url, secret, tuple(events), attempts)
