"""Prometheus `/metrics`: read from the coordinator's store at scrape time, so the numbers are the state the
dashboard and the CLI show, not counters that drift from it. Rejected telemetry is the one in-process count
(a refused window is never stored)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from server.ingest.telemetry import REJECTED
from server.rollout.driver import ACTIVE_PHASES
from server.rollout.engine import ACTIVE
from server.store import Store, now_ms
from server.store.dashboard import DashboardReads
from server.store.freshness import FreshnessRecords
from server.store.loop import AlarmRecords, AlertRecords, DeliveryRecords, JobRecords

__all__ = ["CoordinatorCollector"]


class CoordinatorCollector(Collector):
    def __init__(
        self,
        store: Callable[[], Store],
        broker_connected: Callable[[], bool] | None = None,
        freshness_ms: int = 24 * 3_600_000,
    ) -> None:
        """`store`: this thread's store; `broker_connected`: the coordinator's MQTT session state (None when the
        dashboard runs without a coordinator in the process, e.g. in tests of the API alone); `freshness_ms`: the
        freshness bound past which a device running another release than assigned counts as lagging."""
        self._store = store
        self._broker_connected = broker_connected
        self._freshness_ms = freshness_ms

    def collect(self) -> Iterator[Metric]:
        store = self._store()
        reads = DashboardReads(store)
        devices = GaugeMetricFamily(
            "fedfleet_devices",
            "Devices by update state, running release and presence.",
            labels=["state", "release", "online"],
        )
        for state, release, online, n in reads.devices_by_state():
            devices.add_metric([state or "unknown", release or "none", "true" if online else "false"], n)
        yield devices

        events = CounterMetricFamily(
            "fedfleet_update_events", "Update events devices reported, by kind.", labels=["kind"]
        )
        for kind, n in reads.events_by_kind():
            events.add_metric([kind], n)
        yield events

        ingested = CounterMetricFamily(
            "fedfleet_telemetry_windows_ingested",
            "Telemetry windows stored, by transport (ever: retention pruning does not lower it).",
            labels=["via"],
        )
        for via, n in reads.windows_by_transport():
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

        yield from _rollouts(reads)
        yield from _training(reads)
        yield from _loop(store)
        yield from _behind(store, self._freshness_ms)

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


def _behind(store: Store, freshness_ms: int) -> Iterator[Metric]:
    stale = GaugeMetricFamily(
        "fedfleet_devices_stale",
        "Devices that say they hold no unexpired freshness statement (a newer assignment may be withheld), by fleet.",
        labels=["fleet"],
    )
    lagging = GaugeMetricFamily(
        "fedfleet_devices_lagging",
        "Devices running another release than assigned for longer than the freshness bound, by fleet.",
        labels=["fleet"],
    )
    for fleet, (n_stale, n_lagging) in FreshnessRecords(store).behind_by_fleet(now_ms() - freshness_ms).items():
        stale.add_metric([fleet], n_stale)
        lagging.add_metric([fleet], n_lagging)
    yield stale
    yield lagging


def _rollouts(reads: DashboardReads) -> Iterator[Metric]:
    phase = GaugeMetricFamily(
        "fedfleet_rollout_phase", "1 for each rollout's current phase.", labels=["rollout", "release", "phase"]
    )
    wave = GaugeMetricFamily(
        "fedfleet_rollout_wave", "The wave a rollout is on (-1 before the canary).", labels=["rollout"]
    )
    active = GaugeMetricFamily("fedfleet_rollouts_active", "Rollouts not yet finished.")
    n_active = 0
    for rid, release, ph, w in reads.rollout_phases():
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
    for rid, gates in reads.latest_gates(ACTIVE_PHASES):
        for g in json.loads(gates):
            labels = [rid, g["metric"]]
            threshold.add_metric(labels, g["threshold"])
            failing.add_metric(labels, 1 if g["verdict"] == "fail" else 0)
            if g["value"] is not None:
                value.add_metric(labels, g["value"])
    yield from (value, threshold, failing)


def _training(reads: DashboardReads) -> Iterator[Metric]:
    count, total = reads.round_totals()
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
    for run, rnd, seconds, eps in reads.last_rounds():
        last.add_metric([run], seconds)
        rounds.add_metric([run], rnd)
        if eps is not None:
            epsilon.add_metric([run], eps)
    yield from (last, epsilon, rounds)
    lifetime = reads.max_lifetime_epsilon()
    yield GaugeMetricFamily(
        "fedfleet_privacy_lifetime_epsilon_max", "The largest lifetime ε any device has spent.", value=lifetime
    )
