"""Prometheus `/metrics`: read from the coordinator's store at scrape time, so the numbers are the state the
dashboard and the CLI show, not counters that drift from it. Rejected telemetry is the one in-process count
(a refused window is never stored)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import sqlite_utils
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from server.ingest.telemetry import REJECTED
from server.rollout.driver import ACTIVE_SQL
from server.rollout.engine import ACTIVE
from server.store import Store
from server.store.loop import AlarmRecords, AlertRecords, DeliveryRecords, JobRecords

__all__ = ["CoordinatorCollector"]


class CoordinatorCollector(Collector):
    def __init__(self, store: Callable[[], Store], broker_connected: Callable[[], bool] | None = None) -> None:
        """`store`: this thread's store; `broker_connected`: the coordinator's MQTT session state (None when the
        dashboard runs without a coordinator in the process, e.g. in tests of the API alone)."""
        self._store = store
        self._broker_connected = broker_connected

    def collect(self) -> Iterator[Metric]:
        db = self._store().db
        devices = GaugeMetricFamily(
            "fedfleet_devices",
            "Devices by update state, running release and presence.",
            labels=["state", "release", "online"],
        )
        for state, release, online, n in db.execute(
            "SELECT update_state, running_release, online, count(*) FROM devices GROUP BY 1, 2, 3"
        ):
            devices.add_metric([state or "unknown", release or "none", "true" if online else "false"], n)
        yield devices

        events = CounterMetricFamily(
            "fedfleet_update_events", "Update events devices reported, by kind.", labels=["kind"]
        )
        for kind, n in db.execute("SELECT kind, count(*) FROM events GROUP BY kind"):
            events.add_metric([kind], n)
        yield events

        ingested = CounterMetricFamily(
            "fedfleet_telemetry_windows_ingested", "Telemetry windows stored, by transport.", labels=["via"]
        )
        for via, n in db.execute("SELECT via, count(*) FROM telemetry GROUP BY via"):
            ingested.add_metric([via], n)
        yield ingested
        rejected = CounterMetricFamily(
            "fedfleet_telemetry_windows_rejected",
            "Telemetry windows refused by this coordinator process, by transport.",
            labels=["via"],
        )
        for via in ("mqtt", "grpc"):
            rejected.add_metric([via], REJECTED[via])
        yield rejected

        yield from _rollouts(db)
        yield from _training(db)
        yield from _loop(self._store())

        if self._broker_connected is not None:
            yield GaugeMetricFamily(
                "fedfleet_broker_connected",
                "1 while the coordinator holds a session with the MQTT broker.",
                value=1 if self._broker_connected() else 0,
            )


def _loop(store: Store) -> Iterator[Metric]:
    alerts = GaugeMetricFamily("fedfleet_alerts", "Alerts by kind and state.", labels=["kind", "state"])
    for kind, state, n in AlertRecords(store).counts():
        alerts.add_metric([kind, state], n)
    yield alerts
    deliveries = CounterMetricFamily(
        "fedfleet_alert_deliveries", "Webhook deliveries of alerts, by state.", labels=["state"]
    )
    for state, n in DeliveryRecords(store).counts():
        deliveries.add_metric([state], n)
    yield deliveries
    jobs = GaugeMetricFamily("fedfleet_retrain_jobs", "Retrain jobs by state.", labels=["state"])
    for state, n in JobRecords(store).counts():
        jobs.add_metric([state], n)
    yield jobs
    yield GaugeMetricFamily(
        "fedfleet_drift_alarms_open",
        "Open drift alarms (a fleet's drift over the policy's threshold).",
        value=len(AlarmRecords(store).open_alarms()),
    )


def _rollouts(db: sqlite_utils.Database) -> Iterator[Metric]:
    execute = db.execute
    phase = GaugeMetricFamily(
        "fedfleet_rollout_phase", "1 for each rollout's current phase.", labels=["rollout", "release", "phase"]
    )
    wave = GaugeMetricFamily(
        "fedfleet_rollout_wave", "The wave a rollout is on (-1 before the canary).", labels=["rollout"]
    )
    active = GaugeMetricFamily("fedfleet_rollouts_active", "Rollouts not yet finished.")
    n_active = 0
    for rid, release, ph, w in execute("SELECT id, release_id, phase, wave FROM rollouts"):
        phase.add_metric([rid, release, ph], 1)
        wave.add_metric([rid], w)
        n_active += ph in ACTIVE
    active.add_metric([], n_active)
    yield from (phase, wave, active)

    value = GaugeMetricFamily(
        "fedfleet_rollout_gate_value", "A gate's latest value in a running wave.", labels=["rollout", "metric"]
    )
    threshold = GaugeMetricFamily(
        "fedfleet_rollout_gate_threshold", "A gate's threshold.", labels=["rollout", "metric"]
    )
    failing = GaugeMetricFamily(
        "fedfleet_rollout_gate_failing", "1 when a gate's latest verdict is fail.", labels=["rollout", "metric"]
    )
    for rid, gates in execute(
        f"""SELECT s.rollout_id, s.gates FROM rollout_gate_samples s JOIN rollouts r ON r.id = s.rollout_id
            WHERE r.phase IN ({ACTIVE_SQL})
              AND s.at = (SELECT max(at) FROM rollout_gate_samples WHERE rollout_id = s.rollout_id)"""
    ):
        for g in json.loads(gates):
            labels = [rid, g["metric"]]
            threshold.add_metric(labels, g["threshold"])
            failing.add_metric(labels, 1 if g["verdict"] == "fail" else 0)
            if g["value"] is not None:
                value.add_metric(labels, g["value"])
    yield from (value, threshold, failing)


def _training(db: sqlite_utils.Database) -> Iterator[Metric]:
    execute = db.execute
    count, total = execute("SELECT count(*), COALESCE(sum(seconds), 0) FROM fl_rounds WHERE round > 0").fetchone()
    yield SummaryMetricFamily(
        "fedfleet_fl_round_duration_seconds",
        "Federated training rounds: how long each took.",
        count_value=count,
        sum_value=total,
    )
    last = GaugeMetricFamily(
        "fedfleet_fl_round_last_seconds", "The latest round's duration, per training run.", labels=["run"]
    )
    epsilon = GaugeMetricFamily(
        "fedfleet_fl_epsilon", "The largest ε a client reported by the latest round, per training run.", labels=["run"]
    )
    rounds = GaugeMetricFamily("fedfleet_fl_rounds", "Rounds completed, per training run.", labels=["run"])
    for run, rnd, seconds, eps in execute(
        """SELECT run_id, round, seconds, epsilon_max FROM fl_rounds f
           WHERE round = (SELECT max(round) FROM fl_rounds WHERE run_id = f.run_id)"""
    ):
        last.add_metric([run], seconds)
        rounds.add_metric([run], rnd)
        if eps is not None:
            epsilon.add_metric([run], eps)
    yield from (last, epsilon, rounds)
    (lifetime,) = execute(
        """SELECT COALESCE(max(total), 0) FROM (SELECT device_id, sum(eps) AS total FROM (
             SELECT device_id, run_id, epsilon AS eps, MAX(round) FROM privacy_spend GROUP BY device_id, run_id)
           GROUP BY device_id)"""
    ).fetchone()
    yield GaugeMetricFamily(
        "fedfleet_privacy_lifetime_epsilon_max", "The largest lifetime ε any device has spent.", value=lifetime
    )
