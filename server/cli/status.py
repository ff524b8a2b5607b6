"""`fedfleet status`: the fleet at a glance, as an operator asks first (is the coordinator up, what do devices
run, what is rolling out, what needs attention). Read from the same queries /metrics uses."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from server.cli.common import DEFAULT_DATA_DIR, DataDirOption, JsonOption, open_datadir, out, print_json
from server.datadir import DataDir
from server.loop.kinds import AlertState
from server.rollout.driver import ACTIVE_PHASES
from server.store import now_ms
from server.store.dashboard import DashboardReads
from server.store.freshness import FreshnessRecords
from server.store.loop import AlertRecords
from server.trust.enrollment import running_endpoints

__all__ = ["status"]


def _coordinator(d: DataDir) -> dict[str, Any]:
    endpoints = running_endpoints(d)
    pid = endpoints.get("pid")
    running = isinstance(pid, int) and _alive(pid)
    doc: dict[str, Any] = {"running": running}
    if running:
        doc.update({k: endpoints.get(k) for k in ("pid", "grpc", "mqtt", "dashboard", "grpc_tls")})
    return doc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def collect(d: DataDir) -> dict[str, Any]:
    config = d.config()
    with d.store() as store:
        records = DashboardReads(store)
        by_state = records.devices_by_state()
        rollouts = [
            {"id": rid, "release": release, "phase": phase, "wave": wave}
            for rid, release, phase, wave in records.rollout_phases()
            if phase in ACTIVE_PHASES
        ]
        alerts: Counter[str] = Counter()
        for kind, state, count in AlertRecords(store).counts():
            if state != AlertState.RESOLVED:
                alerts[kind] += count
        behind = FreshnessRecords(store).behind_by_fleet(now_ms() - int(config.freshness_hours * 3_600_000))
        max_epsilon = records.max_lifetime_epsilon()
    releases: Counter[str] = Counter()
    states: Counter[str] = Counter()
    online = 0
    for state, release, is_online, count in by_state:
        releases[release or "none"] += count
        states[state or "unknown"] += count
        online += count if is_online else 0
    return {
        "coordinator": _coordinator(d),
        "devices": {
            "total": sum(states.values()),
            "online": online,
            "by_release": dict(sorted(releases.items())),
            "by_update_state": dict(sorted(states.items())),
            "stale": sum(s for s, _ in behind.values()),
            "lagging": sum(lag for _, lag in behind.values()),
        },
        "rollouts_active": rollouts,
        "alerts_not_resolved": dict(sorted(alerts.items())),
        "privacy": {"max_lifetime_epsilon": max_epsilon, "epsilon_budget": config.epsilon_budget},
    }


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def status(data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False) -> None:
    """The fleet at a glance: the coordinator, devices by release and update state (online, stale, behind),
    active rollouts, alerts not resolved, and the largest lifetime ε against the budget."""
    doc = collect(open_datadir(data_dir))
    if as_json:
        print_json(doc)
        return
    c, devices, privacy = doc["coordinator"], doc["devices"], doc["privacy"]
    if c["running"]:
        out.print(
            f"coordinator  running (pid {c['pid']}): gRPC {c['grpc']}, MQTT {c['mqtt']}, dashboard {c['dashboard']}"
        )
    else:
        out.print("coordinator  not running (`fedfleet serve` starts it)")
    out.print(
        f"devices      {devices['total']} ({devices['online']} online, {devices['stale']} stale, "
        f"{devices['lagging']} behind their assignment)"
    )
    out.print(f"  releases   {_counts(devices['by_release'])}", highlight=False)
    out.print(f"  updates    {_counts(devices['by_update_state'])}", highlight=False)
    rollouts = doc["rollouts_active"]
    out.print(f"rollouts     {len(rollouts)} active", highlight=False)
    for r in rollouts:
        out.print(f"  {r['id']}  {r['release']}  {r['phase']} (wave {r['wave']})", highlight=False)
    out.print(f"alerts       {_counts(doc['alerts_not_resolved'])} (not resolved)", highlight=False)
    share = privacy["max_lifetime_epsilon"] / privacy["epsilon_budget"]
    out.print(
        f"privacy      largest lifetime ε {privacy['max_lifetime_epsilon']:.2f} of a budget of "
        f"{privacy['epsilon_budget']:g} ({share:.0%})",
        highlight=False,
    )
