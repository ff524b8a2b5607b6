"""What the dashboard shows, read from the coordinator's SQLite store: plain functions from a Store (and query
parameters) to JSON-ready documents. The HTTP layer (`server.dashboard.api`) only parses, calls these and
answers; the pages only draw what the API returns.
"""

from __future__ import annotations

import json
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from functools import cache
from typing import Any

from markdown_it import MarkdownIt

from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.drift import WindowCounts, WindowScore, score_window
from edge_agent.contract.windows import counts_from_proto
from server import audit
from server.errors import ConflictError
from server.fl.registry import Ledger, TrainingRuns
from server.ingest.telemetry import release_reference
from server.policy import Policy
from server.rollout.driver import Rollouts
from server.rollout.engine import ACTIVE, Phase, RolloutState, operator_action
from server.rollout.metrics import METRICS
from server.store import Store, now_ms
from server.store.dashboard import DashboardReads
from server.store.freshness import FreshnessRecords
from server.store.monitoring import MonitoringLedger

__all__ = [
    "DeviceFilter",
    "audit_view",
    "device_view",
    "drift_view",
    "fleet_view",
    "ledger_view",
    "render_markdown",
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


DEVICE_POOL_INFERENCES = 500  # a device's drift chart pools consecutive windows until this many inferences


DEVICE_PAGE_WINDOWS = 100  # a device page's newest telemetry windows, by default


def device_view(
    store: Store, device_id: str, limit: int = DEVICE_PAGE_WINDOWS, policy: Policy | None = None
) -> dict[str, Any]:
    """One device with its timeline: assignments, update events and telemetry windows, newest first; and its drift
    over time, consecutive windows of one release pooled to at least `DEVICE_POOL_INFERENCES` inferences (a
    single window's PSI over a few dozen inferences is mostly sampling noise), against the policy's threshold."""
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
    pooled: list[tuple[str, int, int, WindowCounts]] = []  # (release, start, end, counts), oldest first
    for r in reads.device_windows(device_id, limit):
        reference = release_reference(store, r["release_id"])
        score = None
        if reference is not None:
            counts = counts_from_proto(pb.TelemetryWindow.FromString(r["payload"]))
            score = score_window(counts, reference, min_samples=1)
            pooled.append((r["release_id"], r["start_ms"], r["end_ms"], counts))
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
    policy = policy or Policy()
    return {
        "device": {**_device_summary(device), "hardware": device["hardware"], "agent_version": device["agent_version"]},
        "state_words": STATE_WORDS,
        "drift": _pooled_drift(store, list(reversed(pooled))),
        "drift_threshold": _threshold_of(policy),
        "assigned_release": store.assignment_of(device_id) or None,
        "rollouts": rollouts,
        "assignments": assignments,
        "events": events,
        "telemetry": windows,
        "freshness": freshness,
    }


def _pooled_drift(store: Store, windows: list[tuple[str, int, int, WindowCounts]]) -> list[dict[str, Any]]:
    """Consecutive windows of one release pooled until they hold `DEVICE_POOL_INFERENCES` inferences, each group
    scored against its release's reference; a last group still short of that is left out (it is still filling)."""
    points: list[dict[str, Any]] = []
    group: list[tuple[str, int, int, WindowCounts]] = []

    def close() -> None:
        total = group[0][3]
        for w in group[1:]:
            total = total.merge(w[3])
        reference = release_reference(store, group[0][0])
        assert reference is not None
        score = score_window(total, reference, min_samples=1)
        points.append(
            {
                "at": group[-1][2],
                "start_ms": group[0][1],
                "release_id": group[0][0],
                "windows": len(group),
                "inferences": total.inferences,
                **_drift_of(score),
            }
        )

    for w in windows:
        if group and group[0][0] != w[0]:  # another release: what was pooled so far is a (short) group of its own
            close()
            group = []
        group.append(w)
        if sum(g[3].inferences for g in group) >= DEVICE_POOL_INFERENCES:
            close()
            group = []
    return points


# Update states as a person reads them (the agent reports the enum's name on the left), and a wave's device states.
STATE_WORDS = {
    "idle": "idle",
    "updating": "updating",
    "failed": "update failed",
    "unknown": "not reported yet",
    # a rollout wave's devices
    "not_assigned": "not assigned yet",
    "assigned": "assigned, not running it yet",
    "running": "running it",
    "running_offline": "running it, offline",
    "rolling_back": "rolling back",
    "rolled_back": "back on the previous release",
}


def _actions(phase: str, wave: int) -> dict[str, str]:
    """Each operator action and, when the engine would refuse it in this phase, why (empty: allowed). The engine's
    own rules decide, so the page can never offer what the coordinator answers with a 409."""
    state = RolloutState(Phase(phase), wave, 0)
    out = {}
    for action in ("pause", "resume", "abort", "rollback"):
        try:
            operator_action(action, state, 0)
            out[action] = ""
        except ConflictError as e:
            out[action] = str(e)
    return out


def rollouts_view(rollouts: Rollouts) -> list[dict[str, Any]]:
    """Every rollout, newest first, with its wave in words and whether it has finished."""
    return [{**r, "finished": Phase(r["phase"]) not in ACTIVE} for r in reversed(rollouts.list())]


GATE_HISTORY_POINTS = 300  # a long bake's gate samples are thinned to about this many, evenly


# The devices of a wave that count as done, by the rollout's direction.
_DONE_FORWARD = ("running", "running_offline")
_DONE_BACK = ("rolled_back",)


def rollout_view(rollouts: Rollouts, rollout_id: str) -> dict[str, Any]:
    """The rollout's status (waves with their progress, decisions), its gate values over time against the
    thresholds of its own gates, the gates now: the newest value the coordinator kept (at most a few seconds old
    while a wave bakes; after the rollout ends, those of its last verdict, marked final), so that a page view never
    pools telemetry itself; and which operator actions its phase allows."""
    doc = rollouts.status(rollout_id, observe=False)
    phase = Phase(doc["phase"])
    doc["finished"] = phase not in ACTIVE
    doc["actions"] = _actions(doc["phase"], -1 if doc["wave"] is None else doc["wave"])
    backwards = phase in (Phase.ROLLING_BACK, Phase.ROLLED_BACK)
    for w in doc["waves"]:
        devices: dict[str, int] = w["devices"]
        if phase is Phase.ROLLED_BACK and "rolling_back" in devices:
            # the engine ended the rollback when every device reported its previous release; a device that never
            # ran this release has no rollback of its own to report
            devices["rolled_back"] = devices.get("rolled_back", 0) + devices.pop("rolling_back")
            w["devices"] = dict(sorted(devices.items()))
        total = sum(devices.values())
        done = sum(devices.get(k, 0) for k in (_DONE_BACK if backwards else _DONE_FORWARD))
        w["label"] = w["name"]
        w["progress"] = {"done": done, "total": total, "direction": "back" if backwards else "forward"}
    doc["thresholds"] = {g["metric"]: {"op": g["op"], "threshold": g["threshold"]} for g in doc["spec"]["gates"]}
    doc["gate_history"] = [
        {"at": r["at"], "wave": r["wave"], "gates": json.loads(r["gates"])}
        for r in DashboardReads(rollouts.store).gate_history(rollout_id, GATE_HISTORY_POINTS)
    ]
    history = doc["gate_history"]
    doc["state_words"] = STATE_WORDS
    doc["gates_final"] = bool(doc["finished"])
    if doc["finished"]:  # the values its last verdict was made on, as `status` gives them
        doc["gates_at"] = doc["gates_at_ms"]
    elif history and phase in (Phase.BAKING, Phase.GATING, Phase.PAUSED) and history[-1]["wave"] == doc["wave"]:
        doc["gates"], doc["gates_at"] = history[-1]["gates"], history[-1]["at"]
    else:
        doc["gates"], doc["gates_at"] = [], None
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
    store: Store,
    cohort_by: str = "fleet",
    minutes: float = 30.0,
    buckets: int = 30,
    release: str = "",
    policy: Policy | None = None,
) -> dict[str, Any]:
    """Per cohort (a label's values, or fleets) and release: per-feature PSI, the prediction-score PSI and the
    largest input PSI in each time bucket, each bucket's windows pooled and scored against the reference of the
    release they ran. The newest bucket, still filling, is marked `partial`; the policy's drift threshold is
    given for the charts' threshold line."""
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
                "partial": (b + 1) * width > until,
                "windows": len(rowids),
                "inferences": counts.inferences,
                "feature_psi": [round(float(v), 5) for v in score.feature_psi],
                **_drift_of(score),
            }
        )
    scored = sorted({release_id for _, release_id, _ in groups})
    features = {r: int(ref.feature_edges.shape[0]) for r in scored if (ref := release_reference(store, r))}
    policy = policy or Policy()
    return {
        "cohort_by": cohort_by,
        "threshold": _threshold_of(policy),
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
    # ε of noised telemetry windows per device, apart from training's: totals like `devices` above, for any reader;
    # the full record (remaining, newest sequence, when it arrived) is the privacy officer's export
    # (GET /api/privacy/monitoring, `fedfleet privacy monitoring`), from the same query.
    monitoring = [
        {
            "device": s.device_id,
            "windows": s.windows,
            "epsilon": s.epsilon,
            "device_spent": s.device_spent,
            "budget": s.device_budget,
            "exhausted": s.exhausted,
        }
        for s in MonitoringLedger(store).spends()
    ]
    return {
        "default_budget": default_budget,
        "devices": list(devices.values()),
        "spend": rows,
        "monitoring": monitoring,
    }


@cache
def _markdown() -> MarkdownIt:
    # CommonMark with tables; raw HTML off, so a card's `<script>` is text. Link targets are checked by
    # markdown-it's validateLink (no javascript:, vbscript:, file: or non-image data: URLs).
    return MarkdownIt("commonmark", {"html": False}).enable("table")


def render_markdown(text: str) -> str:
    """A model card's Markdown as HTML safe to put in a page: every raw HTML tag in it is escaped as text."""
    return str(_markdown().render(text))


def audit_view(store: Store, limit: int = 200, action: str = "") -> dict[str, Any]:
    checked, problems = audit.verify(store)
    entries = audit.entries(store, limit, action or None)
    return {
        "verified": not problems,
        "checked": checked,
        "problems": [str(p) for p in problems],
        "actors": sorted({a["actor"] for a in entries}),
        "actions": sorted({a["action"] for a in entries}),
        "entries": entries,
    }


def _threshold_of(policy: Policy) -> dict[str, Any]:
    """The drift threshold the policy alarms at: the line the drift charts draw."""
    return {"metric": policy.retrain_metric, "value": policy.retrain_threshold, "source": policy.source}


def _drift_of(score: WindowScore | None) -> dict[str, float | None]:
    """A window's drift figures as the pages show them, from the metric registry."""
    return {
        key: None if score is None or (of_score := METRICS[metric].of_score) is None else of_score(score)
        for key, metric in (("max_psi", "input_max_psi"), ("score_psi", "score_psi"))
    }
