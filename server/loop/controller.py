"""The loop controller: one `tick` (driven by `fedfleet serve`'s rollout thread) watches drift, moves retrain jobs
and keeps the alerts on rollouts, privacy budgets, silent devices and devices behind (stale, or lagging their
assignment past the freshness bound) current."""

from __future__ import annotations

import logging
from collections import defaultdict

from server.datadir import DataDir
from server.loop.alerts import Alerts
from server.loop.data_quality import DataQualityWatch
from server.loop.drift_watch import DriftWatch
from server.loop.kinds import AlertKind
from server.loop.retrain import RetrainController
from server.policy import Policy
from server.rollout.driver import Rollouts
from server.rollout.engine import Phase
from server.store import Store, now_ms
from server.store.freshness import FreshnessRecords

__all__ = ["LoopController"]

logger = logging.getLogger(__name__)

_SLOW_CHECK_MS = 10_000


class LoopController:
    def __init__(self, datadir: DataDir, store: Store, rollouts: Rollouts, policy: Policy, budget: float) -> None:
        self.store = store
        self.policy = policy
        self.budget = budget
        self.alerts = Alerts(store, policy.webhooks)
        self.retrain = RetrainController(datadir, store, self.alerts, rollouts, policy)
        self.watch = DriftWatch(store, self.alerts, self.retrain.decide)
        self.data_quality = DataQualityWatch(store, self.alerts, policy)
        self.rollouts = rollouts
        self.freshness_ms = int(datadir.config().freshness_hours * 3_600_000)
        self._next_slow_check = 0

    def tick(self, now: int | None = None) -> None:
        now = now_ms() if now is None else now
        self.watch.tick(self.policy, now)
        self.retrain.tick()
        self._rollout_alerts()
        if now >= self._next_slow_check:  # the ledger and every device's last contact: not at every tick
            self._privacy_alerts()
            self._silence_alerts(now)
            self._behind_alerts(now)
            self.data_quality.tick(now)
            self._next_slow_check = now + _SLOW_CHECK_MS

    def _rollout_alerts(self) -> None:
        held: set[str] = set()
        for r in self.rollouts.list():
            phase = Phase(r["phase"])
            if phase in (Phase.ROLLING_BACK, Phase.ROLLED_BACK):
                self.alerts.raise_alert(
                    AlertKind.ROLLOUT_ROLLED_BACK,
                    r["id"],
                    f"rolledback:{r['id']}",
                    f"rollout {r['id']} of {r['release']} failed its gates; its devices go back",
                    {"rollout": r["id"], "release": r["release"], "wave": r["wave"]},
                )
            elif phase is Phase.PAUSED or (phase is Phase.GATING and r["last_decision"].startswith("hold")):
                key = f"held:{r['id']}"
                held.add(key)
                self.alerts.raise_alert(
                    AlertKind.ROLLOUT_HELD,
                    r["id"],
                    key,
                    f"rollout {r['id']} of {r['release']} is {'paused' if phase is Phase.PAUSED else 'held'} at wave "
                    f"{r['wave']}",
                    {"rollout": r["id"], "release": r["release"], "wave": r["wave"], "phase": str(phase)},
                )
        self.alerts.resolve_all_but("held:", held, "the rollout moves again (or ended)")

    def _privacy_alerts(self) -> None:
        from server.fl.registry import Ledger  # numpy and SQL only; no torch

        ledger = Ledger(self.store, self.budget)
        spent: dict[str, float] = defaultdict(float)
        budgets: dict[str, float] = {}
        for row in ledger.rows():
            spent[row["device"]] = max(spent[row["device"]], row["lifetime_epsilon"])
            budgets[row["device"]] = row["budget"]
        fraction = self.policy.alerts_privacy_budget_fraction
        for device, epsilon in spent.items():
            budget = budgets[device]
            if budget > 0 and epsilon >= fraction * budget:
                self.alerts.raise_alert(
                    AlertKind.PRIVACY_BUDGET,
                    device,
                    f"privacy:{device}",
                    f"device {device} has spent ε {epsilon:.2f} of its lifetime budget {budget:g}",
                    {"device": device, "epsilon": epsilon, "budget": budget},
                )

    def _silence_alerts(self, now: int) -> None:
        cutoff = now - int(self.policy.alerts_silent_after_seconds * 1000)
        silent: dict[str, list[str]] = defaultdict(list)
        for d in self.store.devices():
            if d["last_seen"] < cutoff:
                silent[d["fleet"]].append(d["id"])
        for fleet, ids in silent.items():
            self.alerts.raise_alert(
                AlertKind.DEVICES_SILENT,
                fleet,
                f"silent:{fleet}",
                f"{len(ids)} device(s) of fleet {fleet} silent for over {self.policy.alerts_silent_after_seconds:g} s",
                {"fleet": fleet, "devices": ids[:50], "count": len(ids)},
            )
        self.alerts.resolve_all_but("silent:", {f"silent:{f}" for f in silent}, "every device was heard again")

    def _behind_alerts(self, now: int) -> None:
        """One alert per fleet with stale devices (they say they hold no unexpired freshness statement), one per
        fleet with devices running another release than assigned for longer than the freshness bound."""
        records = FreshnessRecords(self.store)
        for kind, prefix, rows, what in (
            (AlertKind.DEVICES_STALE, "stale:", records.stale_devices(), "report no fresh statement (stale)"),
            (
                AlertKind.DEVICES_LAGGING,
                "lagging:",
                records.lagging(now - self.freshness_ms),
                f"run another release than assigned for over {self.freshness_ms / 3_600_000:g} h",
            ),
        ):
            by_fleet: dict[str, list[str]] = defaultdict(list)
            for r in rows:
                by_fleet[r["fleet"]].append(r["device_id"])
            for fleet, ids in by_fleet.items():
                self.alerts.raise_alert(
                    kind,
                    fleet,
                    f"{prefix}{fleet}",
                    f"{len(ids)} device(s) of fleet {fleet} {what}",
                    {"fleet": fleet, "devices": ids[:50], "count": len(ids)},
                )
            self.alerts.resolve_all_but(prefix, {f"{prefix}{f}" for f in by_fleet}, "no device of the fleet is behind")
