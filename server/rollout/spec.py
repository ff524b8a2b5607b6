"""What a rollout is asked to do: the release, the devices, the waves, the gates. Parsed from CLI flags or a TOML
file (flags win), checked in full before anything is stored. No I/O here but reading the file.

    release = "digits@2.0.0"
    fleet = "lab"                      # optional; all fleets if unset
    selector = { site = "north" }      # optional label selector
    canary = 2                         # devices in the canary wave
    canary_by = "site"                 # optional: one canary device per value of this label, at least
    cohort_by = "site"                 # optional (default canary_by): gates are judged per value of this label
                                       # too, so drift in one site is not averaged away by the others
    waves = [0.1, 0.5, 1.0]            # cumulative fractions after the canary; the last must be 1.0
    seed = 7                           # chooses the canary and the wave order
    bake_seconds = 300                 # each wave runs this long before its gates are judged
    silent_after_seconds = 600         # a device with no outcome this long after its assignment is silent
    on_fail = "rollback"               # or "hold", "pause"
    min_samples = 500                  # samples, in the wave and in the control, before any telemetry verdict:
                                       # inferences, or what noised windows' counts are worth (fewer)
    min_devices = 1                    # devices reporting telemetry, before any telemetry verdict
    control_lookback_seconds = 3600    # the control's telemetry starts this long before the rollout
    gate_window_seconds = 0            # judge only the latest this many seconds (a hold can then lift); 0: the
                                       # whole wave

    [[gates]]                          # replaces the default gates when given
    metric = "class_mix_shift"
    op = "<="
    threshold = 0.25
"""

from __future__ import annotations

import math
import random
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from server.errors import CoordinatorError
from server.rollout.metrics import METRICS

__all__ = [
    "DEFAULT_GATES",
    "Gate",
    "OnFail",
    "RolloutSpec",
    "RolloutSpecError",
    "load_spec",
    "parse_gate",
    "plan_waves",
]


class RolloutSpecError(CoordinatorError):
    """A rollout spec that cannot be run as written."""


class OnFail(StrEnum):
    ROLLBACK = "rollback"
    HOLD = "hold"
    PAUSE = "pause"


_OPS = ("<=", ">=", "<", ">")
_SECONDS = ("bake_seconds", "silent_after_seconds", "control_lookback_seconds", "gate_window_seconds")
_GATE = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Gate:
    """Passes while `metric op threshold` holds, e.g. input_max_psi <= 0.25."""

    metric: str
    op: str
    threshold: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise RolloutSpecError(f"unknown gate metric {self.metric!r}; known: {', '.join(METRICS)}")
        if self.op not in _OPS:
            raise RolloutSpecError(f"gate {self.metric}: comparison {self.op!r} must be one of {', '.join(_OPS)}")
        if not math.isfinite(self.threshold):
            raise RolloutSpecError(f"gate {self.metric}: threshold must be a finite number")
        if METRICS[self.metric].fraction and not 0 <= self.threshold <= 1:
            raise RolloutSpecError(
                f"gate {self.metric}: a fraction, so its threshold must lie in [0, 1] (got {self.threshold:g}): "
                "beyond that the gate could never fail"
            )

    def holds(self, value: float) -> bool:
        return {
            "<=": value <= self.threshold,
            ">=": value >= self.threshold,
            "<": value < self.threshold,
            ">": value > self.threshold,
        }[self.op]

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


def parse_gate(text: str) -> Gate:
    """'input_max_psi<=0.25' → Gate."""
    m = _GATE.match(text)
    if not m:
        raise RolloutSpecError(f"gate {text!r} must read METRIC OP NUMBER, e.g. input_max_psi<=0.25")
    try:
        threshold = float(m.group(3))
    except ValueError as e:
        raise RolloutSpecError(f"gate {text!r}: {m.group(3)!r} is not a number") from e
    return Gate(m.group(1), m.group(2), threshold)


# Defaults: PSI 0.25 is the usual "significant shift" line; a tenth of the wave failing or silent stops it.
DEFAULT_GATES: tuple[Gate, ...] = (
    Gate("input_max_psi", "<=", 0.25),
    Gate("input_mean_psi", "<=", 0.1),
    Gate("input_max_kl", "<=", 0.5),
    Gate("score_psi", "<=", 0.25),
    Gate("class_mix_shift", "<=", 0.25),
    Gate("latency_p95_ratio", "<=", 2.0),
    Gate("error_rate", "<=", 0.01),
    Gate("failure_rate", "<=", 0.1),
    Gate("silent_fraction", "<=", 0.1),
)


@dataclass(frozen=True)
class RolloutSpec:
    release: str
    fleet: str | None = None
    selector: Mapping[str, str] = field(default_factory=dict)
    canary: int = 1
    canary_by: str = ""
    cohort_by: str = ""  # judge gates per value of this label too (default: canary_by); any failing cohort fails
    waves: tuple[float, ...] = (0.1, 0.5, 1.0)
    seed: int = 0
    bake_seconds: float = 300.0
    silent_after_seconds: float = 600.0
    on_fail: OnFail = OnFail.ROLLBACK
    min_samples: int = 500  # compared with effective samples (edge_agent.contract.drift.effective_samples)
    min_devices: int = 1
    control_lookback_seconds: float = 3600.0
    gate_window_seconds: float = 0.0  # judge the last this many seconds of telemetry; 0: all since the wave began
    gates: tuple[Gate, ...] = DEFAULT_GATES

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.release:
            problems.append("name the release (name@version)")
        if self.canary < 1:
            problems.append("canary must be at least 1 device")
        if not self.waves or any(not 0 < w <= 1 for w in self.waves):
            problems.append("waves must be fractions in (0, 1]")
        elif list(self.waves) != sorted(set(self.waves)) or self.waves[-1] != 1.0:
            problems.append("waves must increase and end at 1.0")
        for name in _SECONDS:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                problems.append(f"{name} must be a non-negative number")
        if self.min_samples < 1 or self.min_devices < 1:
            problems.append("min_samples and min_devices must be at least 1")
        if not self.gates:
            problems.append("give at least one gate")
        if len({str(g) for g in self.gates}) != len(self.gates):
            problems.append("a gate is listed twice")
        if problems:
            raise RolloutSpecError("rollout spec: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["selector"] = dict(self.selector)
        doc["waves"] = list(self.waves)
        doc["gates"] = [asdict(g) for g in self.gates]
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RolloutSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(doc) - known
        if unknown:
            raise RolloutSpecError(f"rollout spec: unknown setting(s) {', '.join(sorted(unknown))}")
        values = dict(doc)
        try:
            if "waves" in values:
                values["waves"] = tuple(float(w) for w in values["waves"])
            if "gates" in values:
                values["gates"] = tuple(_gate_from(g) for g in values["gates"])
            if "on_fail" in values:
                values["on_fail"] = OnFail(values["on_fail"])
            if "selector" in values:
                values["selector"] = {str(k): str(v) for k, v in dict(values["selector"]).items()}
            for name, kind in (("canary", int), ("seed", int), ("min_samples", int), ("min_devices", int)):
                if name in values:
                    values[name] = _exact(kind, values[name], name)
            for name in _SECONDS:
                if name in values:
                    values[name] = float(values[name])
        except (TypeError, ValueError) as e:
            raise RolloutSpecError(f"rollout spec: {e}") from e
        return cls(**values)


def _exact(kind: type[int], value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number")
    return kind(value)


def _gate_from(doc: Any) -> Gate:
    if isinstance(doc, str):
        return parse_gate(doc)
    if not isinstance(doc, Mapping) or set(doc) != {"metric", "op", "threshold"}:
        raise RolloutSpecError("each gate needs exactly metric, op and threshold (or a string like 'score_psi<=0.25')")
    return Gate(str(doc["metric"]), str(doc["op"]), float(doc["threshold"]))


def load_spec(path: Path | None, **overrides: Any) -> RolloutSpec:
    """A spec from a TOML file (or none), with the given not-None settings replacing the file's: CLI flags win."""
    doc: dict[str, Any] = {}
    if path is not None:
        try:
            doc = tomllib.loads(path.read_text())
        except OSError as e:
            raise RolloutSpecError(f"cannot read rollout spec {path}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise RolloutSpecError(f"{path} is not valid TOML: {e}") from e
    doc.update({k: v for k, v in overrides.items() if v is not None})
    if not doc.get("release"):
        raise RolloutSpecError("name the release: `fedfleet rollout start NAME@VERSION` or release = … in the spec")
    return RolloutSpec.from_json(doc)


def plan_waves(spec: RolloutSpec, devices: Sequence[tuple[str, Mapping[str, str]]]) -> list[list[str]]:
    """Split the devices into waves: the canary first, then up to each cumulative fraction. Seeded, so the same
    spec over the same devices gives the same plan. Waves that would add nobody are left out."""
    if spec.canary > len(devices):
        raise RolloutSpecError(f"a canary of {spec.canary} needs that many devices; the selection has {len(devices)}")
    rng = random.Random(spec.seed)
    order = sorted(devices, key=lambda d: d[0])
    rng.shuffle(order)
    canary: list[str] = []
    if spec.canary_by:
        cohorts: dict[str, list[str]] = {}
        for device_id, labels in order:
            cohorts.setdefault(labels.get(spec.canary_by, ""), []).append(device_id)
        if len(cohorts) > spec.canary:
            raise RolloutSpecError(
                f"a canary of {spec.canary} cannot represent the {len(cohorts)} values of label "
                f"{spec.canary_by!r} ({', '.join(sorted(c or '(none)' for c in cohorts))}); raise --canary"
            )
        canary = [members[0] for _, members in sorted(cohorts.items())]
    chosen = set(canary)
    rest = [d for d, _ in order if d not in chosen]
    canary += rest[: spec.canary - len(canary)]
    rest = rest[len(canary) - len(chosen) :]
    waves = [canary]
    total = len(devices)
    done = len(canary)
    for fraction in spec.waves:
        upto = max(done, math.ceil(fraction * total))
        if upto > done:
            waves.append(rest[done - len(canary) : upto - len(canary)])
            done = upto
    return waves
