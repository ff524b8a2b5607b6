"""`fedfleet status`: the fleet at a glance, as an operator asks first (is the coordinator up, what do devices
run, what is rolling out, what needs attention); `Control.status` collects it, locally or through the API."""

from __future__ import annotations

from server.cli.common import DEFAULT_DATA_DIR, DataDirOption, JsonOption, out, print_json
from server.cli.remote import connect

__all__ = ["status"]


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def status(data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False) -> None:
    """The fleet at a glance: the coordinator, devices by release and update state (online, stale, behind),
    active rollouts, alerts not resolved, and the largest lifetime ε against the budget."""
    with connect(data_dir) as fleet:
        doc = fleet.status()
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
        out.print(f"  {r['id']}  {r['release']}  {r['phase']} ({r['wave_label']})", highlight=False)
    out.print(f"alerts       {_counts(doc['alerts_not_resolved'])} (not resolved)", highlight=False)
    share = privacy["max_lifetime_epsilon"] / privacy["epsilon_budget"]
    out.print(
        f"privacy      largest lifetime ε {privacy['max_lifetime_epsilon']:.2f} of a budget of "
        f"{privacy['epsilon_budget']:g} ({share:.0%})",
        highlight=False,
    )
