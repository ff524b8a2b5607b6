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
    on_drift = "retrain"                       # off | alert (audit only) | retrain (train, release, roll out)
    metric = "input_max_psi"                   # input_max_psi | input_mean_psi | score_psi
    threshold = 0.25
    window_seconds = 30                        # telemetry pooled over this much of the recent past
    min_devices = 2                            # devices that must have reported in the window
"""

from __future__ import annotations

import contextlib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.contract import LIMITS
from server.errors import CoordinatorError
from server.rollout_spec import METRICS, Gate, RolloutSpec, RolloutSpecError, parse_gate

__all__ = ["Policy", "PolicyError", "PolicyViolation", "load_policy"]


class PolicyError(CoordinatorError):
    """policy.toml itself is malformed."""


class PolicyViolation(CoordinatorError):
    """What was asked breaks the policy; `rules` names every broken rule."""

    def __init__(self, what: str, rules: list[str], source: str) -> None:
        self.rules = rules
        super().__init__(f"{what} refused by policy ({source}): " + "; ".join(rules))


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
    "retrain": {"on_drift", "metric", "threshold", "window_seconds", "min_devices"},
}
RETRAIN_ACTIONS = ("off", "alert", "retrain")
DRIFT_METRICS = ("input_max_psi", "input_mean_psi", "score_psi")


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
            retrain_threshold=float(retrain.get("threshold", 0.25)),
            retrain_window_seconds=float(retrain.get("window_seconds", 30.0)),
            retrain_min_devices=int(retrain.get("min_devices", 2)),
        )
    except (TypeError, ValueError, RolloutSpecError) as e:
        raise PolicyError(f"policy {path}: {e}") from e
    return policy
