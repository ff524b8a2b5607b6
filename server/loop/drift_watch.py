"""Fleet-wide drift on the running release, judged against the policy's [retrain] section, as alarms with a life.

`read_fleet_drift` pools the recent telemetry of a fleet's devices on the release most of them run and reads the
policy's metric (server.rollout.metrics, one of SCORE_METRICS). `DriftWatch.tick` turns readings into alarms:

    none ─(value > threshold, enough evidence, cool-down over)─► open ─(value < RESOLVE_FRACTION * threshold)─► resolved
                                                                 └─(the fleet runs another release)──────► resolved

One open alarm per (fleet, release): sustained drift does not alarm at every tick. After an alarm resolves, the same
(fleet, release) alarms again only after `retrain.cooldown_seconds`, so a value hovering at the threshold does not
flap. Evidence: a reading has a value only when the pool holds `retrain.min_samples_per_bin` samples per feature
bin from `retrain.min_devices` devices; fewer samples make a healthy fleet's PSI cross 0.25 by chance
(benchmarks/drift_false_alarms.py). Samples are effective samples: the inferences, or what they are worth when
devices noise their windows (edge_agent.contract.drift.effective_samples; the score itself needs as many).

Opening an alarm, its audit entry, its alert and what the policy decides about it (`on_open`, from the retrain
controller) commit in one transaction.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from edge_agent.contract.drift import effective_samples
from server import audit
from server.crashpoints import crash_point
from server.ingest.events import EventRejected
from server.ingest.telemetry import pool, release_reference
from server.loop.alerts import Alerts
from server.loop.kinds import AlertKind
from server.policy import Policy
from server.store import Store, now_ms
from server.store.loop import AlarmRecords

__all__ = ["RESOLVE_FRACTION", "DriftReading", "DriftWatch", "read_fleet_drift"]

logger = logging.getLogger(__name__)

RESOLVE_FRACTION = 0.8  # an open alarm resolves once the metric is below this fraction of the threshold
ACTOR = "coordinator"


@dataclass(frozen=True)
class DriftReading:
    fleet: str
    release_id: str
    metric: str
    value: float | None  # None: not enough evidence to say
    threshold: float
    devices: int
    windows: int
    samples: int  # effective samples: the inferences, fewer when windows were noised
    needed_samples: int

    @property
    def over(self) -> bool:
        return self.value is not None and self.value > self.threshold

    def describe(self) -> str:
        if self.value is None:
            return (
                f"{self.metric} not judged on {self.release_id} in fleet {self.fleet}: {self.samples} of "
                f"{self.needed_samples} samples from {self.devices} device(s)"
            )
        relation = ">" if self.over else "<="
        return (
            f"{self.metric} {self.value:.3f} {relation} {self.threshold:g} on {self.release_id} in fleet {self.fleet}"
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "over": self.over}


def read_fleet_drift(store: Store, fleet: str, policy: Policy, now: int | None = None) -> DriftReading | None:
    """The fleet's drift on its most common running release over the policy window; None if no device runs one."""
    devices = store.devices(fleet)
    running = Counter(d["running_release"] for d in devices if d.get("running_release"))
    if not running:
        return None
    release_id = running.most_common(1)[0][0]
    try:
        reference = release_reference(store, release_id)
    except EventRejected:
        return None  # devices report a release this coordinator never published: nothing to compare with
    if reference is None:
        return None  # a release without a drift reference cannot drift
    ids = [d["id"] for d in devices if d.get("running_release") == release_id]
    since = (now if now is not None else now_ms()) - int(policy.retrain_window_seconds * 1000)
    needed = policy.retrain_min_samples_per_bin * reference.n_bins
    pooled = pool(store, release_id, ids, since_ms=since, min_samples=needed)
    value = pooled.metric(policy.retrain_metric) if pooled.devices >= policy.retrain_min_devices else None
    return DriftReading(
        fleet,
        release_id,
        policy.retrain_metric,
        value,
        policy.retrain_threshold,
        pooled.devices,
        pooled.windows,
        effective_samples(pooled.counts),
        needed,
    )


# Called inside the transaction that opens an alarm: (alarm id, reading) → the decision, as said in the audit.
OnOpen = Callable[[int, DriftReading], str]


class DriftWatch:
    def __init__(self, store: Store, alerts: Alerts, on_open: OnOpen) -> None:
        self.store = store
        self.alerts = alerts
        self.alarms = AlarmRecords(store)
        self.on_open = on_open

    def tick(self, policy: Policy, now: int | None = None) -> list[int]:
        """Read every fleet's drift and open or resolve alarms; returns the ids of the alarms opened."""
        if policy.retrain_on_drift == "off":
            return []
        now = now_ms() if now is None else now
        opened: list[int] = []
        for fleet in self.store.fleets():
            reading = read_fleet_drift(self.store, fleet, policy, now)
            current = {a["release_id"]: a for a in self.alarms.open_alarms(fleet)}
            for release_id, alarm in current.items():
                if reading is None or reading.release_id != release_id:
                    self._resolve(alarm, f"fleet {fleet} no longer runs {release_id} on most devices", now)
                elif reading.value is not None:
                    self.alarms.observe(alarm["id"], reading.value)
                    if reading.value < RESOLVE_FRACTION * alarm["threshold"]:
                        self._resolve(alarm, f"drift fell back: {reading.describe()}", now)
            if reading is None or not reading.over or reading.release_id in current:
                continue
            last = self.alarms.last_resolved_at(fleet, reading.release_id)
            if last is not None and now - last < policy.retrain_cooldown_seconds * 1000:
                continue
            opened.append(self._open(reading, policy, now))
            crash_point("loop.alarm:raised")
        return opened

    def _open(self, reading: DriftReading, policy: Policy, now: int) -> int:
        with self.store.transaction():
            alarm_id = self.alarms.open(
                reading.fleet,
                reading.release_id,
                reading.metric,
                reading.threshold,
                float(reading.value or 0.0),
                reading.devices,
                policy.retrain_on_drift,
                now,
            )
            detail = {
                "alarm": alarm_id,
                **reading.to_json(),
                "policy": f"retrain.on_drift = {policy.retrain_on_drift!r}",
            }
            audit.append(self.store, "drift.alarm", reading.fleet, detail, ACTOR)
            self.alerts.raise_alert(
                AlertKind.DRIFT_ALARM,
                reading.fleet,
                _alert_key(reading.fleet, reading.release_id),
                f"drift alarm {alarm_id}: {reading.describe()}",
                detail,
            )
            decision = self.on_open(alarm_id, reading)
        logger.warning("drift alarm %d: %s; %s", alarm_id, reading.describe(), decision)
        return alarm_id

    def _resolve(self, alarm: dict[str, Any], why: str, now: int) -> None:
        with self.store.transaction():
            if not self.alarms.resolve(alarm["id"], why, now):
                return
            audit.append(self.store, "drift.resolved", alarm["fleet"], {"alarm": alarm["id"], "why": why}, ACTOR)
            self.alerts.resolve(_alert_key(alarm["fleet"], alarm["release_id"]), why)
        logger.info("drift alarm %d resolved: %s", alarm["id"], why)


def _alert_key(fleet: str, release_id: str) -> str:
    return f"drift:{fleet}:{release_id}"
