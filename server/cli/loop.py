"""`fedfleet alerts` and `fedfleet loop`: the closed loop's alerts, drift alarms and retrain jobs, and a person's
answer to a proposed retraining."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from server.cli.common import DEFAULT_DATA_DIR, DataDirOption, JsonOption, out, print_json, print_rows
from server.cli.remote import connect
from server.loop.kinds import AlertState

__all__ = ["alerts_app", "loop_app"]

alerts_app = typer.Typer(
    help="Alerts: drift alarms, retrain proposals, failed trainings, held or rolled-back rollouts, privacy budgets, "
    "silent devices. Webhooks in policy.toml ([[alerts.webhooks]]) receive them too.",
    no_args_is_help=True,
)
loop_app = typer.Typer(
    help="The closed loop run by `fedfleet serve`: drift alarms and the retrain jobs they lead to.",
    no_args_is_help=True,
)


def _when(ms: int | None) -> str:
    return "-" if ms is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


@alerts_app.command("list")
def alerts_list(
    state: Annotated[AlertState | None, typer.Option(help="Only alerts in this state (default: every state).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 50,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Alerts, newest first, with their state and webhook deliveries."""
    with connect(data_dir) as fleet:
        rows = fleet.alerts(str(state) if state else None, limit)

    def cells(r: dict[str, Any]) -> list[str]:
        sent = sum(1 for x in r["deliveries"] if x["state"] == "delivered")
        hooks = f"{sent}/{len(r['deliveries'])}" if r["deliveries"] else "-"
        return [str(r["id"]), _when(r["created_at"]), r["kind"], r["state"], r["summary"], hooks]

    print_rows(rows, as_json, ["id", "opened", "kind", "state", "summary", "webhooks"], cells, "No alerts.")


@alerts_app.command("ack")
def alerts_ack(
    alert_id: Annotated[int, typer.Argument(metavar="ALERT")],
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Acknowledge an open alert: a person has seen it. It stays until its cause is gone."""
    with connect(data_dir) as fleet:
        alert = fleet.alert_ack(alert_id)
    if as_json:
        print_json(alert)
    else:
        out.print(f"Alert {alert_id} ({alert['kind']}) is {alert['state']}.")


@loop_app.command("status")
def loop_status(data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False) -> None:
    """Drift alarms and retrain jobs, newest first."""
    with connect(data_dir) as fleet:
        doc = fleet.loop_state(20)
    alarms, jobs = doc["alarms"], doc["jobs"]
    if as_json:
        print_json({"alarms": alarms, "jobs": jobs})
        return
    print_rows(
        alarms,
        False,
        ["alarm", "opened", "fleet", "release", "metric", "value", "peak", "state"],
        lambda a: [
            str(a["id"]),
            _when(a["opened_at"]),
            a["fleet"],
            a["release_id"],
            a["metric"],
            f"{a['value']:.3f} > {a['threshold']:g}",
            f"{a['peak']:.3f}",
            a["state"] + (f" ({a['resolution']})" if a["resolution"] else ""),
        ],
        "No drift alarms.",
    )
    print_rows(
        jobs,
        False,
        ["job", "alarm", "fleet", "state", "model", "release", "rollout", "error"],
        lambda j: [
            str(j["id"]),
            str(j["alarm_id"]),
            j["fleet"],
            j["state"],
            j["model_version"] or "-",
            j["release_id"] or "-",
            j["rollout_id"] or "-",
            j["error"] or "",
        ],
        "No retrain jobs.",
    )


def _answer(job_id: int, approve: bool, data_dir: Any, as_json: bool) -> None:
    with connect(data_dir) as fleet:
        job = fleet.loop_answer(job_id, approve)
    if as_json:
        print_json(job)
    elif approve:
        out.print(f"Retrain job {job_id} approved: `fedfleet serve` starts training at its next tick.")
    else:
        out.print(f"Retrain job {job_id} rejected: nothing will be trained for it.")


JobArg = Annotated[int, typer.Argument(metavar="JOB", help="A retrain job id (`fedfleet loop status`).")]


@loop_app.command("approve")
def loop_approve(job_id: JobArg, data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False) -> None:
    """Approve a proposed retraining (policy retrain.on_drift = "review"): train, release, roll out."""
    _answer(job_id, True, data_dir, as_json)


@loop_app.command("reject")
def loop_reject(job_id: JobArg, data_dir: DataDirOption = DEFAULT_DATA_DIR, as_json: JsonOption = False) -> None:
    """Reject a proposed retraining: it closes, nothing is trained; the drift alarm stays until drift goes."""
    _answer(job_id, False, data_dir, as_json)
