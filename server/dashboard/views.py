"""What the dashboard shows, read from the coordinator's SQLite store: plain functions from a Store (and query
parameters) to JSON-ready documents. The HTTP layer (`server.dashboard.api`) only parses, calls these and
answers; the pages only draw what the API returns.
"""

from __future__ import annotations

import json
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.drift import WindowCounts, WindowScore, score_window
from edge_agent.contract.windows import counts_from_proto
from server import audit
from server.fl.registry import Ledger, Registry, TrainingRuns, model_card, model_card_markdown
from server.ingest.telemetry import release_reference
from server.rollout.driver import Rollouts
from server.rollout.metrics import METRICS
from server.store import Store, now_ms
from server.store.dashboard import DashboardReads
from server.store.freshness import FreshnessRecords

__all__ = [
    "DeviceFilter",
    "audit_view",
    "device_view",
    "drift_view",
    "fleet_view",
    "ledger_view",
    "model_view",
    "models_view",
    "rollout_view",
    "rollouts_view",
    "training_run_view",
    "training_view",
]

MAX_DRIFT_WINDOWS = 20_000  # the newest windows a drift view pools; older ones are left out (and said so)
DRIFT_MIN_SAMPLES = 50  # a time bucket with fewer inferences gets no PSI (it would be noise)


@dataclass(frozen=True)
class DeviceFilter:
    """The fleet page's search: every field narrows the list; empty means any."""

    q: str = ""  # substring of the device id
    fleet: str = ""
    release: str = ""  # running release id; "none" for devices running nothing yet
    state: str = ""  # update state as the agent reports it
    online: bool | None = None
    label: tuple[str, str] | None = None  # key, value

    def matches(self, d: dict[str, Any]) -> bool:
        if self.q and self.q.lower() not in d["id"].lower():
            return False
        if self.fleet and d["fleet"] != self.fleet:
            return False
        if self.release and (d["running_release"] or "none") != self.release:
            return False
        if self.state and (d["update_state"] or "unknown") != self.state:
            return False
        if self.online is not None and d["online"] != self.online:
            return False
        return not (self.label and d["labels"].get(self.label[0]) != self.label[1])


def _device_summary(d: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": d["id"],
        "fleet": d["fleet"],
        "labels": d["labels"],
        "online": d["online"],
        "running_release": d["running_release"] or None,
        "update_state": d["update_state"] or "unknown",
        "last_seen": d["last_seen"],
        "last_event": d["last_event"] or None,
        "last_error": d["last_error"] or None,
        "stale": d["stale"],
    }


def fleet_view(store: Store, where: DeviceFilter, limit: int = 200, offset: int = 0) -> dict[str, Any]:
    """Counts over the whole fleet (by release, state, presence and label), and one page of the devices that match."""
    devices = store.devices()
    by_label: dict[str, Counter[str]] = {}
    for d in devices:
        for k, v in d["labels"].items():
            by_label.setdefault(k, Counter())[v] += 1
    matching = [d for d in devices if where.matches(d)]
    return {
        "total": len(devices),
        "online": sum(1 for d in devices if d["online"]),
        "by_release": dict(sorted(Counter(d["running_release"] or "none" for d in devices).items())),
        "by_state": dict(sorted(Counter(d["update_state"] or "unknown" for d in devices).items())),
        "by_fleet": dict(sorted(Counter(d["fleet"] for d in devices).items())),
        "by_label": {k: dict(sorted(c.items())) for k, c in sorted(by_label.items())},
        "matching": len(matching),
        "devices": [_device_summary(d) for d in matching[offset : offset + limit]],
    }


def device_view(store: Store, device_id: str, limit: int = 100) -> dict[str, Any]:
    """One device with its timeline: assignments, update events and telemetry windows, newest first."""
    device = store.device(device_id)
    assignments = [
        {k: r[k] for k in ("counter", "release_id", "rollout_id", "created_at", "published_at")}
        for r in store.assignments(device_id, limit)
    ]
    events = [
        {k: e[k] for k in ("id", "counter", "release_id", "kind", "reason", "detail", "received_at", "via")}
        for e in store.events(device_id, limit)
    ]
    windows = []
    reads = DashboardReads(store)
    for r in reads.device_windows(device_id, limit):
        reference = release_reference(store, r["release_id"])
        score = None
        if reference is not None:
            counts = counts_from_proto(pb.TelemetryWindow.FromString(r["payload"]))
            score = score_window(counts, reference, min_samples=1)
        windows.append(
            {
                **{k: r[k] for k in ("sequence", "first_sequence", "release_id", "start_ms", "end_ms", "via")},
                "inferences": r["inferences"],
                "errors": r["errors"],
                **_drift_of(score),
            }
        )
    rollouts = reads.device_rollouts(device_id)
    statement = FreshnessRecords(store).current(device_id)
    freshness = {
        "stale": device["stale"],  # what the device last said
        "fresh_until": device["fresh_until"] or None,  # the expiry of the statement it holds
        "director_counter": statement["counter"] if statement else None,  # what the director states now
        "statement_expires_at": statement["expires_at"] if statement else None,
    }
    return {
        "device": {**_device_summary(device), "hardware": device["hardware"], "agent_version": device["agent_version"]},
        "assigned_release": store.assignment_of(device_id) or None,
        "rollouts": rollouts,
        "assignments": assignments,
        "events": events,
        "telemetry": windows,
        "freshness": freshness,
    }


def rollouts_view(rollouts: Rollouts) -> list[dict[str, Any]]:
    return list(reversed(rollouts.list()))  # newest first


GATE_HISTORY_POINTS = 300  # a long bake's gate samples are thinned to about this many, evenly


def rollout_view(rollouts: Rollouts, rollout_id: str) -> dict[str, Any]:
    """The rollout's status (waves, decisions), its gate values over time, and the gates now: the newest value
    the coordinator kept (at most a few seconds old while a wave bakes), so that a page view never pools
    telemetry itself."""
    doc = rollouts.status(rollout_id, observe=False)
    doc["gate_history"] = [
        {"at": r["at"], "wave": r["wave"], "gates": json.loads(r["gates"])}
        for r in DashboardReads(rollouts.store).gate_history(rollout_id, GATE_HISTORY_POINTS)
    ]
    history = doc["gate_history"]
    fresh = history and doc["phase"] in ("baking", "gating", "paused") and history[-1]["wave"] == doc["wave"]
    doc["gates"] = history[-1]["gates"] if fresh else []
    doc["gates_at"] = history[-1]["at"] if fresh else None
    return doc


# Bucket widths the drift view chooses from (seconds): fixed steps, so buckets line up from one request to the
# next and a closed bucket's pooled counts can be reused.
BUCKET_LADDER_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)
_BUCKET_CACHE_SIZE = 4000  # pooled buckets kept (each a few KB)


class _BucketCache:
    """Pooled counts per (store, cohort, release, bucket) with the windows they pooled, as (count, sum of
    rowids, largest rowid). Stored windows never change and new ones get larger rowids, so a bucket is decoded
    once, and afterwards only the windows that arrived since are decoded and added."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[Any, ...], tuple[tuple[int, int, int], WindowCounts]] = OrderedDict()
        self._lock = threading.Lock()

    def pooled(self, store: Store, key: tuple[Any, ...], rowids: list[int]) -> WindowCounts:
        with self._lock:
            hit = self._entries.get(key)
        counts: WindowCounts | None = None
        new = rowids
        if hit is not None:
            (n, total, last), cached = hit
            old = [r for r in rowids if r <= last]
            if len(old) == n and sum(old) == total:  # the same windows as before, and maybe some new ones
                counts, new = cached, [r for r in rowids if r > last]
        if new:
            more = _pool_rows(store, new)
            counts = more if counts is None else counts.merge(more)
        assert counts is not None
        with self._lock:
            self._entries[key] = ((len(rowids), sum(rowids), max(rowids)), counts)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return counts


_BUCKETS = _BucketCache(_BUCKET_CACHE_SIZE)


def _pool_rows(store: Store, rowids: list[int]) -> WindowCounts:
    total: WindowCounts | None = None
    for payload in DashboardReads(store).payloads(rowids):
        counts = counts_from_proto(pb.TelemetryWindow.FromString(payload))
        total = counts if total is None else total.merge(counts)
    assert total is not None
    return total


def drift_view(
    store: Store, cohort_by: str = "fleet", minutes: float = 30.0, buckets: int = 30, release: str = ""
) -> dict[str, Any]:
    """Per cohort (a label's values, or fleets) and release: per-feature PSI, the prediction-score PSI and the
    largest input PSI in each time bucket, each bucket's windows pooled and scored against the reference of the
    release they ran."""
    until = now_ms()
    since = until - int(minutes * 60_000)
    devices = {d["id"]: d for d in store.devices()}
    rows = DashboardReads(store).recent_windows(since, release, MAX_DRIFT_WINDOWS + 1)
    truncated = len(rows) > MAX_DRIFT_WINDOWS
    rows = rows[:MAX_DRIFT_WINDOWS]
    if rows:  # the buckets cover the telemetry there is, not an empty stretch before it
        since = max(since, min(r[3] for r in rows))
    span = max(1, until - since)
    width = next((w * 1000 for w in BUCKET_LADDER_S if w * 1000 * max(1, buckets) >= span), BUCKET_LADDER_S[-1] * 1000)
    groups: dict[tuple[str, str, int], list[int]] = {}
    for rowid, device_id, release_id, end_ms in rows:
        if release_reference(store, release_id) is None:
            continue
        d = devices.get(device_id)
        cohort = (d["fleet"] if cohort_by == "fleet" else d["labels"].get(cohort_by, "(none)")) if d else "(unknown)"
        groups.setdefault((cohort, release_id, end_ms // width), []).append(rowid)
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for (cohort, release_id, b), rowids in sorted(groups.items()):
        counts = _BUCKETS.pooled(store, (str(store.path), cohort_by, width, cohort, release_id, b), rowids)
        reference = release_reference(store, release_id)
        assert reference is not None
        score = score_window(counts, reference, min_samples=DRIFT_MIN_SAMPLES)
        if score is None:
            continue
        series.setdefault((cohort, release_id), []).append(
            {
                "at": b * width + width // 2,
                "windows": len(rowids),
                "inferences": counts.inferences,
                "feature_psi": [round(float(v), 5) for v in score.feature_psi],
                **_drift_of(score),
            }
        )
    scored = sorted({release_id for _, release_id, _ in groups})
    features = {r: int(ref.feature_edges.shape[0]) for r in scored if (ref := release_reference(store, r))}
    return {
        "cohort_by": cohort_by,
        "since": since,
        "until": until,
        "bucket_ms": width,
        "truncated": truncated,
        "features": features,
        "series": [
            {"cohort": cohort, "release": release_id, "points": points}
            for (cohort, release_id), points in sorted(series.items())
        ],
    }


def training_view(store: Store) -> list[dict[str, Any]]:
    runs = TrainingRuns(store)
    return [{**r, "rounds": runs.rounds(r["id"])} for r in reversed(runs.list())]


def training_run_view(store: Store, run_id: str) -> dict[str, Any]:
    runs = TrainingRuns(store)
    return {**runs.run(run_id), "rounds": runs.rounds(run_id), "incidents": runs.incidents(run_id)}


def ledger_view(store: Store, default_budget: float) -> dict[str, Any]:
    rows = Ledger(store, default_budget).rows()
    devices: dict[str, dict[str, Any]] = {}
    for r in rows:  # in run order per device: the last row holds the lifetime
        devices[r["device"]] = {
            "device": r["device"],
            "lifetime_epsilon": r["lifetime_epsilon"],
            "budget": r["budget"],
            # runs it trained in; its drift-reference rows (purpose) belong to those runs
            "runs": devices.get(r["device"], {}).get("runs", 0) + (r.get("purpose", "training") == "training"),
        }
    return {"default_budget": default_budget, "devices": list(devices.values()), "spend": rows}


def models_view(store: Store) -> list[dict[str, Any]]:
    return list(reversed(Registry(store).list()))


def model_view(store: Store, version: str) -> dict[str, Any]:
    m = Registry(store).get(version)
    return {"version": version, "card": model_card(m), "card_markdown": model_card_markdown(m)}


def audit_view(store: Store, limit: int = 200, action: str = "") -> dict[str, Any]:
    checked, problems = audit.verify(store)
    return {
        "verified": not problems,
        "checked": checked,
        "problems": [str(p) for p in problems],
        "entries": audit.entries(store, limit, action or None),
    }


def _drift_of(score: WindowScore | None) -> dict[str, float | None]:
    """A window's drift figures as the pages show them, from the metric registry."""
    return {
        key: None if score is None or (of_score := METRICS[metric].of_score) is None else of_score(score)
        for key, metric in (("max_psi", "input_max_psi"), ("score_psi", "score_psi"))
    }
