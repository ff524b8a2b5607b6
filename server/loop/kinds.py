"""The names the loop shares with the policy, the store and the wire: alert kinds and states."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["AlertKind", "AlertState"]


class AlertKind(StrEnum):
    DRIFT_ALARM = "drift_alarm"  # a fleet's drift on its running release is over the policy's threshold
    RETRAIN_PROPOSED = "retrain_proposed"  # on_drift = "review": a retraining waits for `fedfleet loop approve`
    TRAINING_FAILED = "training_failed"  # a retraining (training, release or its rollout's start) failed
    ROLLOUT_HELD = "rollout_held"  # a rollout waits on a failing gate or an operator
    ROLLOUT_ROLLED_BACK = "rollout_rolled_back"  # a rollout's gates failed and the fleet went back
    PRIVACY_BUDGET = "privacy_budget"  # a device has spent most of its lifetime ε
    DEVICES_SILENT = "devices_silent"  # devices of a fleet have not been heard for a while
    DEVICES_STALE = "devices_stale"  # devices of a fleet hold no unexpired freshness statement (they said so)
    DEVICES_LAGGING = "devices_lagging"  # devices of a fleet run another release than assigned past the freshness bound
    INVALID_INPUTS = "invalid_inputs"  # a fleet's inputs break their release's input schema past the policy's rate
    STALE_DATA = "stale_data"  # devices of a fleet made no inference for the policy's data_quality bound


class AlertState(StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"
