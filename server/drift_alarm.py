"""Fleet-wide drift on the running release, judged against the policy's [retrain] section.

`check_fleet_drift` pools the recent telemetry of a fleet's devices on the release most of them run and
compares the policy's metric with its threshold. When it is over, `raise_alarm` records the alarm and the
decision the policy dictates (alert only, or retrain) in the audit trail, in one transaction; what retraining
means (train with Flower + Opacus, release, roll out) is the caller's, so this module stays free of torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from server import audit
from server.policy import Policy
from server.store import Store, now_ms
from server.telemetry import pool

__all__ = ["DriftAlarm", "check_fleet_drift", "raise_alarm"]

_METRIC = {"input_max_psi": "max_psi", "input_mean_psi": "mean_psi", "score_psi": "score_psi"}


@dataclass(frozen=True)
class DriftAlarm:
    fleet: str
    release_id: str
    metric: str
    value: float | None  # None: not enough evidence to score
    threshold: float
    devices: int
    windows: int
    over: bool
    decision: str  # the policy's on_drift: off, alert, retrain

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_fleet_drift(store: Store, fleet: str, policy: Policy, now: int | None = None) -> DriftAlarm | None:
    """The fleet's drift on its most common running release over the policy window; None if no device runs one."""
    devices = store.devices(fleet)
    running = Counter(d["running_release"] for d in devices if d.get("running_release"))
    if not running:
        return None
    release_id = running.most_common(1)[0][0]
    ids = [d["id"] for d in devices if d.get("running_release") == release_id]
    since = (now if now is not None else now_ms()) - int(policy.retrain_window_seconds * 1000)
    pooled = pool(store, release_id, ids, since_ms=since)
    score = pooled.to_json()
    value = score.get(_METRIC[policy.retrain_metric])
    enough = pooled.devices >= policy.retrain_min_devices and value is not None
    return DriftAlarm(
        fleet,
        release_id,
        policy.retrain_metric,
        None if value is None else float(value),
        policy.retrain_threshold,
        pooled.devices,
        pooled.windows,
        bool(enough and value is not None and float(value) > policy.retrain_threshold),
        policy.retrain_on_drift,
    )


def raise_alarm(store: Store, alarm: DriftAlarm, actor: str = "drift-monitor") -> None:
    """Audit the alarm and the policy's decision about it (one transaction)."""
    with store.transaction():
        audit.append(store, "drift.alarm", alarm.fleet, alarm.to_json(), actor)
        audit.append(
            store,
            f"retrain.{'decided' if alarm.decision == 'retrain' else 'not-decided'}",
            alarm.fleet,
            {"policy": f"retrain.on_drift = {alarm.decision!r}", "release": alarm.release_id},
            actor,
        )
