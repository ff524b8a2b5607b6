"""The fleet's control operations as JSON documents: what `fedfleet` prints and what the API answers.

One implementation, two callers. `fedfleet` on the coordinator's host calls `Control` over the data directory; the
API calls the same `Control` for a signed-in user; `fedfleet --server URL` (server/cli/remote.py) speaks the API and
so gets the same documents back. `Fleet` is the seam: the CLI talks to one, local or remote.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Protocol

from server import audit
from server.datadir import DataDir
from server.errors import ConflictError, CoordinatorError, NotFoundError
from server.loop.alerts import Alerts
from server.loop.kinds import AlertState
from server.loop.retrain import answer_proposal
from server.rollout.driver import ACTIVE_PHASES, Rollouts
from server.rollout.spec import RolloutSpec
from server.store import Release, Store, now_ms
from server.store.consent import ConsentRecords
from server.store.dashboard import DashboardReads
from server.store.freshness import FreshnessRecords
from server.store.loop import AlarmRecords, AlertRecords, DeliveryRecords, JobRecords
from server.store.monitoring import MonitoringLedger
from server.store.releases import ReleaseRecords
from server.trust.enrollment import running_endpoints
from server.trust.releases import publish_release, release_source, retire_release
from server.users import OPERATOR

__all__ = [
    "Control",
    "Fleet",
    "consent_doc",
    "device_doc",
    "fleet_status",
    "release_card_markdown",
    "release_doc",
    "releases_doc",
]

CONSENT_PURPOSE = "training"  # the purpose `fedfleet privacy consent` reports (server.store.consent.PURPOSES)


def release_doc(r: Release) -> dict[str, Any]:
    return {"release": r.id, "target": r.target_path, "sha256": r.sha256, "length": r.length}


def releases_doc(store: Store, rollouts: Rollouts) -> list[dict[str, Any]]:
    """Every release, newest first: where it came from (`release_source`), when it was published and retired, the
    devices running it and its rollouts (`fedfleet releases list`, the dashboard's Releases page, GET /api/releases)."""
    running = Counter(d["running_release"] for d in store.devices() if d["running_release"])
    retired = ReleaseRecords(store).all_retired()
    by_release: dict[str, list[dict[str, Any]]] = {}
    for r in rollouts.list():
        by_release.setdefault(r["release"], []).append({"id": r["id"], "phase": r["phase"]})
    return [
        {
            "id": r.id,
            "name": r.name,
            "version": r.version,
            "source": release_source(r.custom),
            "target": r.target_path,
            "created_at": r.created_at,
            "retired_at": retired.get(r.id),
            "bytes": r.length,
            "sha256": r.sha256,
            "devices_running": running.get(r.id, 0),
            "rollouts": by_release.get(r.id, []),
            "has_card": "model_card" in r.custom or "model_card_markdown" in r.custom,
        }
        for r in reversed(store.releases())
    ]


def device_doc(row: dict[str, Any], assigned: str) -> dict[str, Any]:
    return {
        "id": row["id"],
        "fleet": row["fleet"],
        "labels": row["labels"],
        "online": row["online"],
        "assigned_release": assigned or None,
        "running_release": row["running_release"] or None,
        "running_counter": row["running_counter"],
        "update_state": row["update_state"] or None,
        "last_event": row["last_event"] or None,
        "last_error": row["last_error"] or None,
        "last_seen": row["last_seen"],
        "stale": row["stale"],
    }


def consent_doc(statement: dict[str, Any] | None) -> dict[str, Any]:
    """A consent statement as `fedfleet privacy consent` shows it: granted, withdrawn, or unknown (none recorded),
    with when and from where (`agent`: the owner's agent.toml, reported at registration; `user:NAME`)."""
    if statement is None:
        return {"consent": "unknown", "recorded_at": None, "source": None}
    return {
        "consent": "granted" if statement["granted"] else "withdrawn",
        "recorded_at": statement["recorded_at"],
        "source": statement["source"],
    }


def release_card_markdown(custom: dict[str, Any], release_id: str) -> str:
    """The release's model card as Markdown: the one it was published with, or one written from its JSON card
    (a file release's --card), each value as the text it is."""
    if isinstance(custom.get("model_card_markdown"), str):
        return str(custom["model_card_markdown"])
    card = custom.get("model_card")
    if not isinstance(card, dict):
        return f"# {release_id}\n\nThis release was published without a model card.\n"
    lines = [f"# Model card: {release_id}", ""]

    def walk(doc: dict[str, Any], depth: int) -> None:
        for key, value in doc.items():
            if isinstance(value, dict):
                lines.append(f"{'  ' * depth}- **{key}**")
                walk(value, depth + 1)
            else:
                shown = json.dumps(value) if isinstance(value, list) else str(value)
                lines.append(f"{'  ' * depth}- **{key}**: {shown}")

    walk(card, 0)
    return "\n".join(lines) + "\n"


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


def fleet_status(d: DataDir, store: Store) -> dict[str, Any]:
    """The fleet at a glance (`fedfleet status`, GET /api/status): the coordinator, devices by release and update
    state, active rollouts, alerts not resolved, the largest lifetime ε against the budget."""
    config = d.config()
    records = DashboardReads(store)
    by_state = records.devices_by_state()
    rollouts = [
        {k: r[k] for k in ("id", "release", "phase", "wave", "wave_label")}
        for r in d.rollouts(store).list()
        if r["phase"] in ACTIVE_PHASES
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


class Fleet(Protocol):
    """What the CLI asks of a coordinator, wherever it runs. Every method returns a JSON-ready document and raises
    CoordinatorError (one sentence) when refused."""

    def publish(
        self, data: bytes, name: str, version: str, probe: dict[str, Any] | None, card: dict[str, Any] | None
    ) -> dict[str, Any]: ...

    def assign(self, release_id: str, devices: list[str], fleet: str | None) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...

    def releases(self) -> list[dict[str, Any]]: ...

    def release(self, release_id: str) -> dict[str, Any]: ...

    def release_retire(self, release_id: str) -> dict[str, Any]: ...

    def rollout_start(self, spec: RolloutSpec) -> dict[str, Any]: ...

    def rollout_status(self, rollout_id: str) -> dict[str, Any]: ...

    def rollout_act(self, rollout_id: str, action: str) -> dict[str, Any]: ...

    def rollouts(self) -> list[dict[str, Any]]: ...

    def devices(self, fleet: str | None) -> list[dict[str, Any]]: ...

    def device(self, device_id: str) -> dict[str, Any]: ...

    def place_device(self, device_id: str, fleet: str | None, labels: dict[str, str] | None) -> dict[str, Any]: ...

    def revoke_device(self, device_id: str) -> dict[str, Any]: ...

    def set_budget(self, device_id: str, epsilon: float) -> dict[str, Any]: ...

    def privacy_ledger(self, device_id: str | None) -> list[dict[str, Any]]: ...

    def privacy_monitoring(self, device_id: str | None) -> list[dict[str, Any]]: ...

    def consent(self) -> list[dict[str, Any]]: ...

    def consent_history(self, device_id: str) -> dict[str, Any]: ...

    def models(self) -> list[dict[str, Any]]: ...

    def model(self, version: str) -> dict[str, Any]: ...

    def alerts(self, state: str | None, limit: int) -> list[dict[str, Any]]: ...

    def loop_state(self, limit: int) -> dict[str, Any]: ...

    def loop_answer(self, job_id: int, approve: bool) -> dict[str, Any]: ...

    def alert_ack(self, alert_id: int) -> dict[str, Any]: ...

    def audit_entries(self, limit: int, action: str | None) -> list[dict[str, Any]]: ...

    def audit_verify(self) -> dict[str, Any]: ...

    def users(self) -> list[dict[str, Any]]: ...

    def user_add(self, name: str, role: str) -> dict[str, Any]: ...

    def user_rotate(self, name: str) -> dict[str, Any]: ...

    def user_revoke(self, name: str) -> dict[str, Any]: ...


class Control:
    """The operations over one data directory and store, done (and audited) as `actor`."""

    def __init__(self, datadir: DataDir, store: Store, actor: str) -> None:
        self.datadir = datadir
        self.store = store
        self.actor = actor

    # ----- releases and assignments -----

    def publish(
        self, data: bytes, name: str, version: str, probe: dict[str, Any] | None, card: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Check a .tflite file against the policy, sign and publish it (server.trust.releases.publish_release)."""
        extra = {"model_card": card} if card is not None else {}
        d = self.datadir
        result = publish_release(d.repository(), self.store, data, name, version, probe, extra, d.policy(), self.actor)
        return {**release_doc(result.release), "created": result.created}

    def assign(self, release_id: str, devices: list[str], fleet: str | None) -> dict[str, Any]:
        rel = self.store.release(release_id)
        targets = devices or (self.store.device_ids(fleet) if fleet is not None else [])
        if not targets:
            raise CoordinatorError(f"fleet {fleet!r} has no registered devices; agents register when they start")
        issued = self.datadir.director().assign(self.store, targets, rel, actor=self.actor)
        return {"release": rel.id, "assignments": [{"device": a.device_id, "counter": a.counter} for a in issued]}

    def releases(self) -> list[dict[str, Any]]:
        return releases_doc(self.store, self.datadir.rollouts(self.store))

    def status(self) -> dict[str, Any]:
        return fleet_status(self.datadir, self.store)

    def release(self, release_id: str) -> dict[str, Any]:
        """One release: its row in `releases` with its target path and model card in Markdown (`fedfleet releases
        show`, GET /api/releases/{id}); an unknown release is refused (NotFoundError)."""
        r = self.store.release(release_id)
        row = next(x for x in self.releases() if x["id"] == r.id)
        return {**row, "target_path": r.target_path, "card_markdown": release_card_markdown(r.custom, r.id)}

    def release_retire(self, release_id: str) -> dict[str, Any]:
        """Take a release out of the update repository once nothing needs it (server.trust.releases)."""
        result = retire_release(self.datadir.repository(), self.store, release_id, ACTIVE_PHASES, self.actor)
        return {"release": release_id, "target": result.release.target_path, "deleted": result.deleted}

    # ----- rollouts -----

    def rollout_start(self, spec: RolloutSpec) -> dict[str, Any]:
        rollouts = self.datadir.rollouts(self.store)
        return rollouts.status(rollouts.start(spec, actor=self.actor))

    def rollout_status(self, rollout_id: str) -> dict[str, Any]:
        return self.datadir.rollouts(self.store).status(rollout_id)

    def rollout_act(self, rollout_id: str, action: str) -> dict[str, Any]:
        step = self.datadir.rollouts(self.store).act(rollout_id, action, actor=self.actor)
        return {"rollout": rollout_id, "phase": str(step.state.phase), "decision": step.decision, "reason": step.reason}

    def rollouts(self) -> list[dict[str, Any]]:
        return self.datadir.rollouts(self.store).list()

    # ----- devices -----

    def devices(self, fleet: str | None) -> list[dict[str, Any]]:
        return [device_doc(r, self.store.assignment_of(r["id"])) for r in self.store.devices(fleet)]

    def device(self, device_id: str) -> dict[str, Any]:
        row = self.store.device(device_id)
        return {
            **device_doc(row, self.store.assignment_of(device_id)),
            "hardware": row["hardware"],
            "agent_version": row["agent_version"],
            "events": self.store.events(device_id, limit=20),
        }

    # ----- placement, privacy and consent -----

    def revoke_device(self, device_id: str) -> dict[str, Any]:
        """Revoke a device's live certificates and rewrite the CRL: the gRPC server refuses it at once, the broker
        once `fedfleet broker config` rewrote its CRL and Mosquitto reloaded; audited with the serials. A device
        with no live certificate is refused (ConflictError), changing nothing."""
        with self.store.transaction():
            serials = self.store.revoke_certificates(device_id)
            if not serials:
                raise ConflictError(f"{device_id!r} has no live certificate (never enrolled, or already revoked)")
            self.datadir.ca().write_crl(self.store.revoked_certificates())
            audit.append(self.store, "device.revoke", device_id, {"serials": serials}, self.actor)
        return {"device": device_id, "revoked": serials, "crl": str(self.datadir.trust / "crl.pem")}

    def place_device(self, device_id: str, fleet: str | None, labels: dict[str, str] | None) -> dict[str, Any]:
        """Set a device's fleet or labels (None: leave as is); audited with the change."""
        with self.store.transaction():
            before = self.store.device(device_id)
            row = self.store.place_device(device_id, fleet, labels)
            change = {"fleet": [before["fleet"], row["fleet"]], "labels": [before["labels"], row["labels"]]}
            audit.append(self.store, "device.label", device_id, change, self.actor)
        return {"device": device_id, "fleet": row["fleet"], "labels": row["labels"]}

    def set_budget(self, device_id: str, epsilon: float) -> dict[str, Any]:
        """Set one device's lifetime ε budget; audited. An unknown device (neither registered nor in the ledger)
        is refused, changing nothing."""
        from server.fl.registry import Ledger  # the registry's numpy work only when asked

        ledger = Ledger(self.store, self.datadir.config().epsilon_budget)
        if device_id not in {r["device"] for r in ledger.rows()}:
            try:
                self.store.device(device_id)
            except NotFoundError as e:
                raise NotFoundError(
                    f"no device {device_id!r}: neither registered nor in the privacy ledger (`fedfleet devices list` "
                    "and `fedfleet privacy ledger` show them)"
                ) from e
        if not epsilon >= 0:
            raise CoordinatorError(f"a budget must be a number >= 0 (got {epsilon})")
        with self.store.transaction():
            ledger.set_budget(device_id, epsilon)
            audit.append(self.store, "privacy.budget", device_id, {"epsilon": epsilon}, self.actor)
        return {"device": device_id, "budget": epsilon, "spent": ledger.lifetime(device_id)}

    def privacy_ledger(self, device_id: str | None) -> list[dict[str, Any]]:
        """Every ledger row (ε and δ per device, run and purpose, lifetime and budget, consent to the run), or one
        device's: the privacy officer's export (`fedfleet privacy ledger`, GET /api/privacy/ledger)."""
        from server.fl.registry import Ledger  # the registry's numpy work only when asked

        rows = Ledger(self.store, self.datadir.config().epsilon_budget).rows()
        return [r for r in rows if device_id is None or r["device"] == device_id]

    def privacy_monitoring(self, device_id: str | None) -> list[dict[str, Any]]:
        """Per device (or one device) its monitoring budget: the ε its noised telemetry windows spent as the
        coordinator stored them, the device's own spend and budget from its newest window, whether it is exhausted,
        and when the newest arrived (`fedfleet privacy monitoring`, GET /api/privacy/monitoring; the monitoring
        ledger, server.store.monitoring). A device that sent no noised window has no row; a device neither
        registered nor in the monitoring ledger is refused (NotFoundError)."""
        spends = MonitoringLedger(self.store).spends(device_id)
        if device_id is not None and not spends and not self.store.is_device(device_id):
            raise NotFoundError(
                f"no device {device_id!r}: neither registered nor in the monitoring ledger (`fedfleet devices list` "
                "and `fedfleet privacy monitoring` show them)"
            )
        return [s.to_json() for s in spends]

    def consent(self) -> list[dict[str, Any]]:
        """Each known device's current consent to training, by device id (`fedfleet privacy consent`, GET
        /api/privacy/consent): granted, withdrawn or unknown, since when and from where; `registered` is false for a
        device with a statement that has not registered yet."""
        return [
            {
                "device": r["device_id"],
                "purpose": CONSENT_PURPOSE,
                **consent_doc(r["statement"]),
                "registered": r["registered"],
            }
            for r in ConsentRecords(self.store).roster(CONSENT_PURPOSE)
        ]

    def consent_history(self, device_id: str) -> dict[str, Any]:
        """One device's consent now and every statement recorded for it, oldest first (`fedfleet privacy consent
        --device ID`, GET /api/privacy/consent/{device_id}). A device neither registered nor with a statement is
        refused (NotFoundError)."""
        history = ConsentRecords(self.store).history(device_id)
        registered = self.store.is_device(device_id)
        if not history and not registered:
            raise NotFoundError(
                f"no device {device_id!r}: neither registered nor with any consent recorded (`fedfleet privacy "
                "consent` lists the devices)"
            )
        current = next((h for h in reversed(history) if h["purpose"] == CONSENT_PURPOSE), None)
        return {
            "device": device_id,
            "purpose": CONSENT_PURPOSE,
            **consent_doc(current),
            "registered": registered,
            "history": [{"purpose": h["purpose"], **consent_doc(h)} for h in history],
        }

    # ----- models -----

    def models(self) -> list[dict[str, Any]]:
        """Registered model versions, newest first, with their run, parent, ε and test accuracy (`fedfleet models
        list`, GET /api/models)."""
        from server.fl.registry import Registry

        return list(reversed(Registry(self.store).list()))

    def model(self, version: str) -> dict[str, Any]:
        """A model version: its card (JSON and Markdown, generated from its lineage), the lineage and its run's
        incidents (`fedfleet models show`, GET /api/models/{version})."""
        from server.fl.registry import Registry, TrainingRuns, model_card, model_card_markdown

        m = Registry(self.store).get(version)
        return {
            "version": m.version,
            "card": model_card(m),
            "card_markdown": model_card_markdown(m),
            "lineage": m.lineage,
            "incidents": TrainingRuns(self.store).incidents(m.run_id),
        }

    # ----- alerts and audit -----

    def loop_state(self, limit: int) -> dict[str, Any]:
        """Drift alarms and retrain jobs, newest first (`fedfleet loop status`, GET /api/loop)."""
        return {"alarms": AlarmRecords(self.store).recent(limit), "jobs": JobRecords(self.store).recent(limit)}

    def loop_answer(self, job_id: int, approve: bool) -> dict[str, Any]:
        """Approve or reject a proposed retraining (`fedfleet loop approve|reject`, POST /api/loop/{job}/{answer})."""
        alerts = Alerts(self.store, self.datadir.policy().webhooks)
        return answer_proposal(self.store, alerts, job_id, approve, self.actor)

    def alerts(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        rows = AlertRecords(self.store).recent(state, limit)
        deliveries = DeliveryRecords(self.store)
        for r in rows:
            r["deliveries"] = deliveries.recent(r["id"])
        return rows

    def alert_ack(self, alert_id: int) -> dict[str, Any]:
        return Alerts(self.store).acknowledge(alert_id, self.actor)

    def audit_entries(self, limit: int, action: str | None) -> list[dict[str, Any]]:
        return audit.entries(self.store, limit, action)

    def audit_verify(self) -> dict[str, Any]:
        checked, problems = audit.verify(self.store)
        return {"entries": checked, "intact": not problems, "problems": [p.__dict__ for p in problems]}

    # ----- users -----

    def users(self) -> list[dict[str, Any]]:
        return self.datadir.users(self.store).list()

    def user_add(self, name: str, role: str) -> dict[str, Any]:
        user, token = self.datadir.users(self.store).add(name, role, self.actor)
        return {**user, "token": token}

    def user_rotate(self, name: str) -> dict[str, Any]:
        """A new token; the `operator` user's is also written to DATA/keys/operator.token, where it lives."""
        users = self.datadir.users(self.store)
        if name != OPERATOR:
            user, token = users.rotate(name, self.actor)
            return {**user, "token": token}
        users.rotate(name, self.actor)  # refused if revoked (`fedfleet dashboard-token --rotate` revives it)
        token = self.datadir.operator_token(rotate=True)
        return {**users.get(name), "token": token}

    def user_revoke(self, name: str) -> dict[str, Any]:
        return self.datadir.users(self.store).revoke(name, self.actor)
