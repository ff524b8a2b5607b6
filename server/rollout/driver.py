"""Rollouts on the coordinator: start one, drive it with `tick` (called by `fedfleet serve`), act on it as an
operator, report on it. The decisions come from `server.rollout.engine`; this module reads SQLite to observe a
wave and applies each transition — assignments, new state, the decision and its audit entry — in one
transaction. A coordinator killed at any point restarts on a state where the step happened entirely or not at
all, and the next tick carries on from there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from edge_agent.contract.drift import effective_samples
from server import audit
from server.crashpoints import crash_point
from server.errors import ConflictError, NotFoundError
from server.ingest.telemetry import Pooled, pool, stale_data
from server.policy import Policy, PolicyViolation
from server.rollout.engine import (
    ACTIVE,
    Phase,
    RolloutState,
    Transition,
    WaveObservation,
    decide,
    evaluate_gates,
    operator_action,
)
from server.rollout.metrics import stale_data_fraction, telemetry_values
from server.rollout.spec import DEFAULT_GATES, RolloutSpec, RolloutSpecError, plan_waves
from server.rollout.waves import wave_label
from server.store import Store, now_ms
from server.store.rollouts import RolloutRecords
from server.trust.director import Director

__all__ = ["ACTIVE_PHASES", "FINAL_FAILURE_KINDS", "Rollouts"]

logger = logging.getLogger(__name__)

# Update events that end an assignment without the release running. A "failed" event is transient (the agent
# retries), so it is not here: such a device stays pending until it commits or counts as silent.
FINAL_FAILURE_KINDS = ("probe_failed", "rejected")

# The active phases as strings, for the store's `phase IN (...)` queries.
ACTIVE_PHASES = tuple(str(p) for p in sorted(ACTIVE))

# A baking or gating wave's gate values are kept at most this often, for the dashboard's charts over time.
GATE_SAMPLE_MS = 2000


@dataclass(frozen=True)
class _Row:
    id: str
    release_id: str
    spec: RolloutSpec
    state: RolloutState
    waves: int
    created_at: int
    updated_at: int


class Rollouts:
    """Rollouts over one store, signed by one director."""

    def __init__(self, store: Store, director: Director, policy: Policy | None = None) -> None:
        self.store = store
        self.records = RolloutRecords(store)
        self.director = director
        self.policy = policy or Policy()
        self._sampled: dict[str, int] = {}  # rollout id → when its gate values were last kept

    # ----- starting -----

    def start(self, spec: RolloutSpec, actor: str = "cli") -> str:
        """Check everything, plan the waves and store the rollout (pending); the next tick assigns the canary.
        A refusal (policy, overlap, no devices, no release to fall back to) stores nothing but its audit entry."""
        release = self.store.release(spec.release)
        if spec.gates == DEFAULT_GATES and self.policy.default_gates:
            spec = RolloutSpec.from_json({**spec.to_json(), "gates": [str(g) for g in self.policy.default_gates]})
        rules = self.policy.release_violations(release.length, release.custom)
        rules += self.policy.rollout_violations(spec, self.director.key_id)
        if rules:
            audit.append(self.store, "policy.refused", spec.release, {"what": "rollout", "rules": rules}, actor)
            raise PolicyViolation(f"rollout of {spec.release}", rules, self.policy.source)
        devices = [
            (d["id"], d["labels"])
            for d in self.store.devices(spec.fleet)
            if all(d["labels"].get(k) == v for k, v in spec.selector.items())
        ]
        if not devices:
            raise RolloutSpecError(
                f"no registered device matches fleet {spec.fleet!r} and selector {dict(spec.selector)}"
            )
        plan = plan_waves(spec, devices)
        with self.store.transaction():
            previous: dict[str, str] = {}
            for device_id, _ in devices:
                current = self.store.current_assignment(device_id)
                if current is None:
                    raise ConflictError(
                        f"device {device_id} has no release to fall back to; give devices their first release with "
                        "`fedfleet assign`, then roll out the next one"
                    )
                if current["release_id"] == release.id:
                    raise ConflictError(f"device {device_id} is already assigned {release.id}")
                previous[device_id] = current["release_id"]
            busy = _busy(self.store, list(previous))
            if busy:
                (device_id, other), *_ = busy.items()
                raise ConflictError(
                    f"{len(busy)} of these devices are in active rollout {other} (e.g. {device_id}); one rollout per "
                    "device at a time: finish, abort or roll that one back first"
                )
            rollout_id = _next_id(self.store)
            now = now_ms()
            self.records.insert(rollout_id, release.id, json.dumps(spec.to_json()), str(Phase.PENDING), now)
            self.records.add_devices(rollout_id, [(d, k, previous[d]) for k, wave in enumerate(plan) for d in wave])
            detail = {"release": release.id, "devices": len(devices), "waves": [len(w) for w in plan]}
            self._decide_row(rollout_id, -1, "created", f"plan: {detail['waves']} devices per wave", ())
            audit.append(self.store, "rollout.start", rollout_id, {**detail, "spec": spec.to_json()}, actor)
        return rollout_id

    # ----- driving -----

    def tick(self, now: int | None = None) -> list[tuple[str, str, str]]:
        """Advance every active rollout by at most one step; returns the decisions recorded (id, decision, reason)."""
        made: list[tuple[str, str, str]] = []
        for row in self._rows(active_only=True):
            now_at = now_ms() if now is None else now
            needs_obs = row.state.phase in (Phase.BAKING, Phase.GATING, Phase.ROLLING_BACK)
            obs = self.observe(row, now_at) if needs_obs else None
            if obs is not None and row.state.phase in (Phase.BAKING, Phase.GATING):
                self._sample_gates(row, obs, now_at)
            step = decide(row.spec, row.state, row.waves, now_at, obs)
            crash_point(f"rollout.{step.decision}:decided")
            if step.state != row.state and self._apply(row, step, "coordinator") and step.decision:
                made.append((row.id, step.decision, step.reason))
                logger.info("rollout %s: %s (%s)", row.id, step.decision, step.reason)
        return made

    def act(self, rollout_id: str, action: str, actor: str = "cli") -> Transition:
        """An operator's pause, resume, abort or rollback. ConflictError when the rollout's phase forbids it."""
        row = self._row(rollout_id)
        step = operator_action(action, row.state, now_ms())
        if not self._apply(row, step, actor):
            raise ConflictError(f"rollout {rollout_id} changed while acting on it; look at its status and retry")
        return step

    def observe(self, row: _Row, now: int) -> WaveObservation:
        """What the coordinator knows of the assigned devices and of the telemetry since the wave began; with a
        cohort label (`cohort_by`, else `canary_by`), the same for each of its values as well."""
        outcomes = self.records.outcomes(row.id, FINAL_FAILURE_KINDS)
        if row.state.phase is Phase.ROLLING_BACK:
            pending = sum(1 for o in outcomes if o["rollback_counter"] is not None and not _rolled_back(o))
            return WaveObservation(0, 0, 0, 0, 0, 0, 0, {}, pending)
        label = row.spec.cohort_by or row.spec.canary_by
        cohorts: dict[str, WaveObservation] = {}
        if label:
            groups: dict[str, list[dict[str, Any]]] = {}
            for o in outcomes:
                groups.setdefault(json.loads(o["labels"]).get(label, ""), []).append(o)
            if len(groups) > 1:
                cohorts = {f"{label}={k}": self._observe(row, now, members) for k, members in groups.items()}
        return dataclasses.replace(self._observe(row, now, outcomes), cohorts=cohorts)

    def _observe(self, row: _Row, now: int, outcomes: list[dict[str, Any]]) -> WaveObservation:
        committed = failed = silent = 0
        running: list[str] = []
        treated = [o for o in outcomes if o["counter"] is not None]
        for o in treated:
            if _runs_release(o, row.release_id):
                committed += 1
                running.append(o["device_id"])
            elif o["failed"]:
                failed += 1
            elif now - o["assigned_at"] > row.spec.silent_after_seconds * 1000:
                silent += 1
        since = row.state.wave_started_ms
        if row.spec.gate_window_seconds:
            since = max(since, now - int(row.spec.gate_window_seconds * 1000))
        wave = pool(self.store, row.release_id, running, since_ms=since, min_samples=1)
        assigned = {o["device_id"]: o["assigned_at"] for o in treated if _runs_release(o, row.release_id)}
        judged, stale = stale_data(self.store, row.release_id, assigned, now, self.policy.data_stale_after_seconds)
        control = self._control(row, outcomes)
        n = len(treated)
        values: dict[str, float | None] = {
            "failure_rate": failed / n if n else None,
            "silent_fraction": silent / n if n else None,
            "stale_data_fraction": stale_data_fraction(judged, stale),
            **telemetry_values(wave.counts, wave.score, control.counts),
        }
        return WaveObservation(
            treated=n,
            committed=committed,
            failed=failed,
            silent=silent,
            samples=effective_samples(wave.counts),
            reporting_devices=wave.devices,
            control_samples=effective_samples(control.counts),
            values=values,
            inferences=wave.counts.inferences,
            control_inferences=control.counts.inferences,
        )

    def _control(self, row: _Row, outcomes: list[dict[str, Any]]) -> Pooled:
        """The control: these devices on the release most of them ran before, over the lookback before the
        rollout and since (devices not yet assigned keep adding to it)."""
        (release, _), *_ = Counter(o["previous_release"] for o in outcomes).most_common(1)
        since = row.created_at - int(row.spec.control_lookback_seconds * 1000)
        devices = [o["device_id"] for o in outcomes if o["previous_release"] == release]
        return pool(self.store, release, devices, since_ms=since, min_samples=1)

    # ----- applying a step -----

    def _apply(self, row: _Row, step: Transition, actor: str) -> bool:
        """Apply one transition atomically, unless the rollout changed since it was read (then nothing)."""
        with self.store.transaction():
            if self.records.version(row.id) != (str(row.state.phase), row.state.wave, row.updated_at):
                return False
            release = self.store.release(row.release_id)
            if step.assign_wave is not None:
                devices = self.records.unassigned(row.id, step.assign_wave)
                issued = self.director.assign(self.store, devices, release, rollout_id=row.id, actor=actor)
                self.records.mark_assigned(row.id, [(a.device_id, a.counter) for a in issued], now_ms())
            if step.rollback:
                back: dict[str, list[str]] = {}
                for device_id, previous_release in self.records.to_roll_back(row.id):
                    back.setdefault(previous_release, []).append(device_id)
                for previous, devices in sorted(back.items()):
                    issued = self.director.assign(
                        self.store, devices, self.store.release(previous), rollout_id=row.id, actor=actor
                    )
                    self.records.mark_rolled_back(row.id, [(a.device_id, a.counter) for a in issued])
            s = step.state
            self.records.set_state(
                row.id, str(s.phase), s.wave, s.wave_started_ms, s.paused_from, s.last_decision, now_ms()
            )
            if step.decision:
                gates = [g.to_json() for g in step.gates]
                self._decide_row(row.id, s.wave, step.decision, step.reason, gates)
                detail = {"wave": s.wave, "phase": str(s.phase), "reason": step.reason, "gates": gates}
                audit.append(self.store, f"rollout.{step.decision}", row.id, detail, actor)
            crash_point(f"rollout.{step.decision}:in-transaction")
        crash_point(f"rollout.{step.decision}:committed")
        return True

    def _sample_gates(self, row: _Row, obs: WaveObservation, now: int) -> None:
        last = self._sampled.get(row.id, 0)
        if now - last < GATE_SAMPLE_MS:
            return
        self._sampled[row.id] = now
        gates = [g.to_json() for g in evaluate_gates(row.spec, obs)]
        self.records.add_gate_sample(row.id, row.state.wave, now, json.dumps(gates))

    def _decide_row(self, rollout_id: str, wave: int, decision: str, reason: str, gates: Any) -> None:
        self.records.add_decision(rollout_id, wave, now_ms(), decision, reason, json.dumps(list(gates)))

    # ----- reading -----

    def _rows(self, active_only: bool = False) -> list[_Row]:
        return [self._to_row(r) for r in self.records.all(ACTIVE_PHASES if active_only else None)]

    def _row(self, rollout_id: str) -> _Row:
        found = self.records.get(rollout_id)
        if found is None:
            raise NotFoundError(f"no rollout {rollout_id!r}; `fedfleet rollout list` shows them")
        return self._to_row(found)

    def _to_row(self, r: dict[str, Any]) -> _Row:
        waves = self.records.wave_count(r["id"])
        state = RolloutState(Phase(r["phase"]), r["wave"], r["wave_started_ms"], r["paused_from"], r["last_decision"])
        spec = RolloutSpec.from_json(json.loads(r["spec"]))
        return _Row(r["id"], r["release_id"], spec, state, int(waves), r["created_at"], r["updated_at"])

    def list(self) -> list[dict[str, Any]]:
        return [
            {
                "id": row.id,
                "release": row.release_id,
                "phase": str(row.state.phase),
                "wave": row.state.wave,
                "wave_label": wave_label(row.state.wave, row.waves),
                "waves": row.waves,
                "last_decision": row.state.last_decision,
                "created_at": row.created_at,
                "updated_at": row.updated_at,
            }
            for row in self._rows()
        ]

    def phase(self, rollout_id: str) -> Phase:
        return self._row(rollout_id).state.phase

    def status(self, rollout_id: str, observe: bool = True) -> dict[str, Any]:
        """Each wave with its devices by state, the current gate values against thresholds, every decision, each
        wave named by `wave_label`. `observe=False` leaves a judged wave's gates out (observing pools the wave's
        telemetry: the costly part); an ended rollout shows the gates of its last verdict (`gates_at_ms`)."""
        row = self._row(rollout_id)
        now = now_ms()
        waves: list[dict[str, Any]] = []
        for k in range(row.waves):
            counts: Counter[str] = Counter()
            for r in self.records.wave_devices(row.id, k):
                counts[_device_state(r, row.release_id)] += 1
            waves.append({"wave": k, "name": wave_label(k, row.waves), "devices": dict(sorted(counts.items()))})
        decisions = [
            {
                **d,
                "wave": d["wave"] if d["wave"] >= 0 else None,  # the rollout's own decisions (created) precede waves
                "wave_label": wave_label(d["wave"], row.waves),
                "gates": json.loads(d["gates"]),
            }
            for d in self.records.decisions(row.id)
        ]
        gates: list[dict[str, Any]] = []
        gates_at_ms = None  # set when the gates are the last verdict's, not judged now
        judging = row.state.phase in (Phase.BAKING, Phase.GATING, Phase.PAUSED)
        if observe and judging:
            gates = [g.to_json() for g in evaluate_gates(row.spec, self.observe(row, now))]
        elif not judging:  # ended or rolling back: the values its last verdict was made on
            judged = [d for d in decisions if d["gates"]]
            if judged:
                gates, gates_at_ms = judged[-1]["gates"], judged[-1]["at"]
        return {
            "id": row.id,
            "release": row.release_id,
            "phase": str(row.state.phase),
            "wave": row.state.wave if row.state.wave >= 0 else None,
            "wave_label": wave_label(row.state.wave, row.waves),
            "last_decision": row.state.last_decision,
            "gates_at_ms": gates_at_ms,
            "waves": waves,
            "bake_remaining_s": max(0.0, row.spec.bake_seconds - (now - row.state.wave_started_ms) / 1000)
            if row.state.phase is Phase.BAKING
            else None,
            "gates": gates,
            "decisions": decisions,
            "spec": row.spec.to_json(),
        }


def _runs_release(r: dict[str, Any], release_id: str) -> bool:
    """The device reports the rollout's release committed at (or after) its assignment."""
    return bool(r["running_release"] == release_id and r["running_counter"] >= r["counter"])


def _rolled_back(r: dict[str, Any]) -> bool:
    """The device reports its previous release committed at (or after) its rollback assignment."""
    return bool(r["running_release"] == r["previous_release"] and r["running_counter"] >= r["rollback_counter"])


def _device_state(r: dict[str, Any], release_id: str) -> str:
    if r["counter"] is None:
        return "not_assigned"
    if r["rollback_counter"] is not None:
        return "rolled_back" if _rolled_back(r) else "rolling_back"
    if _runs_release(r, release_id):
        return "running" if r["online"] else "running_offline"
    return "assigned"


def _busy(store: Store, device_ids: list[str]) -> dict[str, str]:
    """Devices already in an active rollout → that rollout's id."""
    return RolloutRecords(store).busy(device_ids, ACTIVE_PHASES)


def _next_id(store: Store) -> str:
    return f"rollout-{RolloutRecords(store).count() + 1}"
