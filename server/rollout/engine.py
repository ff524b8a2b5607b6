"""The rollout state machine, with no I/O: given a rollout's state, what the coordinator observed of its current
wave and the time, say what happens next. `server.rollout.driver` reads SQLite, calls `decide`, and applies the
returned transition (assignments, state, decision, audit entry) in one transaction, so a crash at any point
leaves either the whole step or none of it.

    pending ─▶ baking(k) ─▶ gating(k) ─▶ baking(k+1) … ─▶ completed
                  │            ├─ gate fails, on_fail=rollback ─▶ rolling_back ─▶ rolled_back
                  │            ├─ gate fails, on_fail=pause ────▶ paused ─(resume)─▶ gating(k)
                  │            └─ gate fails, on_fail=hold ─────▶ gating(k) again next tick
                  └─ install failures / silent devices are judged while baking too
    operator: pause, resume, abort (devices keep what they have), rollback (from any active phase)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from server.errors import ConflictError
from server.rollout.metrics import METRICS, MetricKind
from server.rollout.spec import Gate, OnFail, RolloutSpec

__all__ = [
    "ACTIVE",
    "GateResult",
    "Phase",
    "RolloutState",
    "Transition",
    "Verdict",
    "WaveObservation",
    "decide",
    "evaluate_gates",
    "operator_action",
]


class Phase(StrEnum):
    PENDING = "pending"
    BAKING = "baking"
    GATING = "gating"
    PAUSED = "paused"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    COMPLETED = "completed"
    ABORTED = "aborted"


ACTIVE = frozenset({Phase.PENDING, Phase.BAKING, Phase.GATING, Phase.PAUSED, Phase.ROLLING_BACK})


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INSUFFICIENT = "insufficient"  # too few samples or devices to say: never fires
    UNAVAILABLE = "unavailable"  # the release carries nothing to judge this by (e.g. no drift reference)


@dataclass(frozen=True)
class RolloutState:
    phase: Phase
    wave: int  # -1 before the canary
    wave_started_ms: int
    paused_from: str = ""
    last_decision: str = ""  # key of the last recorded decision, so a standing hold is recorded once


@dataclass(frozen=True)
class WaveObservation:
    """What the coordinator knows of the devices assigned so far and of their telemetry since the wave began."""

    treated: int  # devices assigned the release so far
    committed: int
    failed: int
    silent: int
    samples: int  # effective samples in the wave's pooled telemetry: its inferences, or what noised windows' are worth
    reporting_devices: int
    control_samples: int  # the same for the control; both are compared with min_samples
    values: Mapping[str, float | None]  # metric → value; None when the data carry nothing to compute it from
    rollback_pending: int = 0  # devices told to go back that have not yet reported the previous release
    cohorts: Mapping[str, WaveObservation] = field(default_factory=dict)  # the same per cohort ("site=north")
    inferences: int | None = None  # the inferences behind `samples` (more when windows were noised), for the reason
    control_inferences: int | None = None

    @property
    def pending(self) -> int:
        return self.treated - self.committed - self.failed - self.silent


@dataclass(frozen=True)
class GateResult:
    gate: Gate
    value: float | None
    verdict: Verdict
    note: str = ""
    cohort: str = ""  # set when the verdict is a cohort's ("site=north"), not the pooled wave's

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.gate.metric,
            "op": self.gate.op,
            "threshold": self.gate.threshold,
            "value": self.value,
            "verdict": str(self.verdict),
            "note": self.note or (f"in cohort {self.cohort}" if self.cohort else ""),
            "cohort": self.cohort or None,
        }

    def __str__(self) -> str:
        shown = "n/a" if self.value is None else f"{self.value:.4g}"
        where = f" in cohort {self.cohort}" if self.cohort else ""
        return f"{self.gate.metric} = {shown}{where} (gate {self.gate})"


def evaluate_gates(spec: RolloutSpec, obs: WaveObservation) -> tuple[GateResult, ...]:
    """Each gate on the pooled wave, and each telemetry gate in every cohort too: a cohort that fails it makes it
    fail, naming the cohort and its value (drift at one site must not be averaged away, and the operator should
    see where it is). Device gates are judged on the whole wave only."""
    results: list[GateResult] = []
    for gate in spec.gates:
        result = _judge(spec, gate, obs)
        if METRICS[gate.metric].kind is not MetricKind.DEVICES:
            judged = {name: _judge(spec, gate, c) for name, c in sorted(obs.cohorts.items()) if c.treated}
            failed = [(name, j) for name, j in judged.items() if j.verdict is Verdict.FAIL]
            short = [(name, j) for name, j in judged.items() if j.verdict is Verdict.INSUFFICIENT]
            if failed:
                name, worst = failed[0]
                result = replace(worst, cohort=name)
            elif short and result.verdict is Verdict.PASS:
                # A pass is a pass everywhere: a cohort still short of evidence keeps the gate waiting.
                name, thin = short[0]
                result = replace(result, verdict=Verdict.INSUFFICIENT, note=f"cohort {name}: {thin.note}")
        results.append(result)
    return tuple(results)


def _judge(spec: RolloutSpec, gate: Gate, obs: WaveObservation) -> GateResult:
    kind = METRICS[gate.metric].kind
    value = obs.values.get(gate.metric)
    short = ""
    if kind is not MetricKind.DEVICES:
        if obs.samples < spec.min_samples:
            short = f"{obs.samples} of {spec.min_samples} samples" + _discounted(obs.samples, obs.inferences)
        elif obs.reporting_devices < spec.min_devices:
            short = f"{obs.reporting_devices} of {spec.min_devices} devices reporting"
        elif kind is MetricKind.VERSUS_CONTROL and obs.control_samples < spec.min_samples:
            short = f"control has {obs.control_samples} of {spec.min_samples} samples" + _discounted(
                obs.control_samples, obs.control_inferences
            )
    elif obs.treated == 0:
        short = "no devices assigned yet"
    if short:
        return GateResult(gate, value, Verdict.INSUFFICIENT, short)
    if value is None:
        return GateResult(gate, None, Verdict.UNAVAILABLE, "nothing to compute it from")
    return GateResult(gate, value, Verdict.PASS if gate.holds(value) else Verdict.FAIL)


def _discounted(effective: int, inferences: int | None) -> str:
    worth_less = inferences is not None and effective < inferences
    return f" (noised windows: {inferences} inferences worth {effective})" if worth_less else ""


@dataclass(frozen=True)
class Transition:
    state: RolloutState
    assign_wave: int | None = None  # issue assignments to this wave's devices
    rollback: bool = False  # issue assignments back to each device's previous release
    decision: str = ""  # recorded when not empty: start, advance, hold, pause, rollback, completed, ...
    reason: str = ""
    gates: tuple[GateResult, ...] = ()


def _record(state: RolloutState, key: str, **kwargs: Any) -> Transition:
    """A decision that may stand for many ticks (hold, waiting): recorded when it first appears or changes."""
    if state.last_decision == key:
        return Transition(state)
    return Transition(replace(state, last_decision=key), **kwargs)


def _on_failure(spec: RolloutSpec, state: RolloutState, now_ms: int, gates: tuple[GateResult, ...]) -> Transition:
    failed = [g for g in gates if g.verdict is Verdict.FAIL]
    reason = "gate failed: " + "; ".join(str(g) for g in failed)
    if spec.on_fail is OnFail.ROLLBACK:
        return Transition(
            RolloutState(Phase.ROLLING_BACK, state.wave, now_ms, last_decision="rollback"),
            rollback=True,
            decision="rollback",
            reason=reason,
            gates=gates,
        )
    if spec.on_fail is OnFail.PAUSE:
        paused = RolloutState(Phase.PAUSED, state.wave, state.wave_started_ms, str(Phase.GATING), "pause")
        return Transition(paused, decision="pause", reason=reason + "; waiting for an operator", gates=gates)
    key = "hold:" + ",".join(f"{g.gate.metric}@{g.cohort}" for g in failed)  # a new reason is recorded anew
    gating = replace(state, phase=Phase.GATING)
    return _record(gating, key, decision="hold", reason=reason + "; holding at this wave", gates=gates)


def decide(spec: RolloutSpec, state: RolloutState, waves: int, now_ms: int, obs: WaveObservation | None) -> Transition:
    """The next step. `waves` is the number of planned waves; `obs` is needed in baking, gating and rolling back."""
    if state.phase is Phase.PENDING:
        return Transition(
            RolloutState(Phase.BAKING, 0, now_ms, last_decision="start"),
            assign_wave=0,
            decision="start",
            reason="canary assigned",
        )
    if state.phase is Phase.ROLLING_BACK:
        if obs is not None and obs.rollback_pending == 0:
            done = RolloutState(Phase.ROLLED_BACK, state.wave, state.wave_started_ms, last_decision="rolled_back")
            return Transition(done, decision="rolled_back", reason="every device reports its previous release")
        return Transition(state)
    if state.phase not in (Phase.BAKING, Phase.GATING) or obs is None:
        return Transition(state)

    gates = evaluate_gates(spec, obs)
    baked = now_ms - state.wave_started_ms >= spec.bake_seconds * 1000
    if not baked:
        # Install failures and silent devices need no bake: a wave that fails to install stops at once.
        device_gates = tuple(g for g in gates if METRICS[g.gate.metric].kind is MetricKind.DEVICES)
        if any(g.verdict is Verdict.FAIL for g in device_gates):
            return _on_failure(spec, state, now_ms, device_gates)
        return Transition(state)
    state = replace(state, phase=Phase.GATING)
    if any(g.verdict is Verdict.FAIL for g in gates):
        return _on_failure(spec, state, now_ms, gates)
    if obs.pending:
        reason = f"{obs.pending} of {obs.treated} devices have not installed yet"
        return _record(state, "waiting:installs", decision="waiting", reason=reason, gates=gates)
    short = [g for g in gates if g.verdict is Verdict.INSUFFICIENT]
    if short:
        reason = "too little data for a verdict: " + "; ".join(sorted({g.note for g in short}))
        return _record(state, "waiting:samples", decision="waiting", reason=reason, gates=gates)
    summary = "all gates pass" + "".join(
        f"; {g.gate.metric} not judged ({g.note})" for g in gates if g.verdict is Verdict.UNAVAILABLE
    )
    if state.wave + 1 >= waves:
        done = RolloutState(Phase.COMPLETED, state.wave, state.wave_started_ms, last_decision="completed")
        return Transition(done, decision="completed", reason=summary, gates=gates)
    following = RolloutState(Phase.BAKING, state.wave + 1, now_ms, last_decision="advance")
    return Transition(
        following,
        assign_wave=state.wave + 1,
        decision="advance",
        reason=f"{summary}; wave {state.wave + 1}",
        gates=gates,
    )


def operator_action(action: str, state: RolloutState, now_ms: int) -> Transition:
    """pause, resume, abort or rollback, asked by an operator; refused (ConflictError) where it makes no sense."""
    if state.phase not in ACTIVE:
        raise ConflictError(f"the rollout is {state.phase}; nothing more can be done to it")
    if action == "pause":
        if state.phase in (Phase.PAUSED, Phase.ROLLING_BACK):
            raise ConflictError(f"the rollout is {state.phase}; it cannot be paused")
        paused = RolloutState(Phase.PAUSED, state.wave, state.wave_started_ms, str(state.phase), "pause")
        return Transition(paused, decision="pause", reason="paused by an operator")
    if action == "resume":
        if state.phase is not Phase.PAUSED:
            raise ConflictError(f"the rollout is {state.phase}, not paused")
        back = Phase(state.paused_from or Phase.GATING)
        return Transition(
            RolloutState(back, state.wave, state.wave_started_ms, last_decision="resume"),
            decision="resume",
            reason="resumed by an operator",
        )
    if action == "abort":
        aborted = RolloutState(Phase.ABORTED, state.wave, state.wave_started_ms, last_decision="abort")
        return Transition(aborted, decision="abort", reason="aborted by an operator; devices keep what they run")
    if action == "rollback":
        if state.phase is Phase.ROLLING_BACK:
            raise ConflictError("the rollout is already rolling back")
        reverting = RolloutState(Phase.ROLLING_BACK, state.wave, now_ms, last_decision="rollback")
        return Transition(reverting, rollback=True, decision="rollback", reason="rolled back by an operator")
    raise ConflictError(f"unknown action {action!r}; use pause, resume, abort or rollback")
