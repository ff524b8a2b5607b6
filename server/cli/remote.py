"""The CLI against a coordinator's HTTPS API: `RemoteFleet` speaks it, `connect()` picks local or remote.

Every command that can run from anywhere asks `connect(data_dir)` for a `server.control.Fleet` and calls it; only
`connect` decides where that is (see server/cli/context.py for the order of --server, --context and the current
context). The remote side answers with the documents the local one returns, so output and --json are the same.
HTTPS verifies the coordinator's certificate against --ca (the fleet CA) or the system's trust store; plaintext is
refused beyond loopback. A refusal from the API (403: the role lacks the permission) becomes one sentence.
"""

from __future__ import annotations

import base64
import contextlib
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from server.cli.common import open_datadir
from server.cli.context import RemoteTarget, target
from server.control import Control, Fleet
from server.errors import CoordinatorError
from server.rollout.spec import RolloutSpec

__all__ = ["RemoteFleet", "connect", "is_remote"]

TIMEOUT_SECONDS = 60.0
LOCAL_ACTOR = "cli"


def is_remote() -> bool:
    return target() is not None


@contextlib.contextmanager
def connect(data_dir: Path) -> Iterator[Fleet]:
    """The fleet this command acts on: the coordinator named by --server/--context, else the data directory."""
    remote = target()
    if remote is not None:
        yield RemoteFleet(remote)
        return
    d = open_datadir(data_dir)
    with d.store() as store:
        yield Control(d, store, LOCAL_ACTOR)


def _detail(error: urllib.error.HTTPError) -> str:
    try:
        detail = json.loads(error.read() or b"{}").get("detail", "")
    except (ValueError, AttributeError):
        detail = ""
    if isinstance(detail, list) and detail:  # a validation error: the first problem, where it is
        first = detail[0]
        where = ".".join(str(x) for x in first.get("loc", [])[1:]) if isinstance(first, dict) else ""
        detail = f"{where}: {first.get('msg', first)}" if isinstance(first, dict) else str(first)
    return str(detail) or error.reason or f"HTTP {error.code}"


class RemoteFleet:
    """`server.control.Fleet` over the coordinator's HTTP API, as the user holding the target's token."""

    def __init__(self, remote: RemoteTarget) -> None:
        self.remote = remote
        self._ssl: ssl.SSLContext | None = None
        if remote.server.startswith("https://"):
            self._ssl = ssl.create_default_context(cafile=str(remote.ca) if remote.ca else None)

    def _call(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        url = self.remote.server + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.remote.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS, context=self._ssl) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:
            detail = _detail(e)
            if e.code == 401:
                raise CoordinatorError(
                    f"the coordinator at {self.remote.server} refused the token ({detail}); check --token-file or "
                    "ask an admin for a new one"
                ) from None
            raise CoordinatorError(f"the coordinator refused: {detail}") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise CoordinatorError(
                    f"the certificate of {self.remote.server} is not trusted ({reason.verify_message}); pass --ca "
                    "the fleet CA's certificate (the coordinator's DATA/trust/ca.pem)"
                ) from None
            raise CoordinatorError(f"cannot reach the coordinator at {self.remote.server} ({reason})") from None
        except (TimeoutError, ConnectionError) as e:
            raise CoordinatorError(f"cannot reach the coordinator at {self.remote.server} ({e})") from None

    # ----- releases and assignments -----

    def publish(
        self, data: bytes, name: str, version: str, probe: dict[str, Any] | None, card: dict[str, Any] | None
    ) -> dict[str, Any]:
        body = {
            "name": name,
            "version": version,
            "model": base64.b64encode(data).decode(),
            "probe": probe,
            "model_card": card,
        }
        doc: dict[str, Any] = self._call("POST", "/api/releases", body)
        return doc

    def assign(self, release_id: str, devices: list[str], fleet: str | None) -> dict[str, Any]:
        doc: dict[str, Any] = self._call(
            "POST", "/api/assignments", {"release": release_id, "devices": devices, "fleet": fleet}
        )
        return doc

    def place_device(self, device_id: str, fleet: str | None, labels: dict[str, str] | None) -> dict[str, Any]:
        doc: dict[str, Any] = self._call(
            "PUT", f"/api/devices/{_seg(device_id)}/placement", {"fleet": fleet, "labels": labels}
        )
        return doc

    def revoke_device(self, device_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = self._call("POST", f"/api/devices/{_seg(device_id)}/revoke", {"confirm": device_id})
        return doc

    def set_budget(self, device_id: str, epsilon: float) -> dict[str, Any]:
        doc: dict[str, Any] = self._call("PUT", f"/api/privacy/budgets/{_seg(device_id)}", {"epsilon": epsilon})
        return doc

    def privacy_ledger(self, device_id: str | None) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._call("GET", "/api/privacy/ledger", query={"device": device_id})
        return rows

    def privacy_monitoring(self, device_id: str | None) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._call("GET", "/api/privacy/monitoring", query={"device": device_id})
        return rows

    def consent(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._call("GET", "/api/privacy/consent")
        return rows

    def consent_history(self, device_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = self._call("GET", f"/api/privacy/consent/{_seg(device_id)}")
        return doc

    def models(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._call("GET", "/api/models")
        return rows

    def model(self, version: str) -> dict[str, Any]:
        doc: dict[str, Any] = self._call("GET", f"/api/models/{_seg(version)}")
        return doc

    def releases(self) -> list[dict[str, Any]]:
        docs: list[dict[str, Any]] = self._call("GET", "/api/releases")
        return docs

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = self._call("GET", "/api/status")
        return doc

    def release(self, release_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = self._call("GET", f"/api/releases/{_seg(release_id)}")
        return doc

    def release_retire(self, release_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = self._call("POST", f"/api/releases/{_seg(release_id)}/retire", {"confirm": release_id})
        return doc

    # ----- rollouts -----

    def rollout_start(self, spec: RolloutSpec) -> dict[str, Any]:
        doc: dict[str, Any] = self._call("POST", "/api/rollouts", spec.to_json())
        return doc

    def rollout_status(self, rollout_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = self._call("GET", f"/api/rollouts/{_seg(rollout_id)}/status")
        return doc

    def rollout_act(self, rollout_id: str, action: str) -> dict[str, Any]:
        doc: dict[str, Any] = self._call("POST", f"/api/rollouts/{_seg(rollout_id)}/{action}", {"confirm": rollout_id})
        return doc

    def rollouts(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._call("GET", "/api/rollouts")
        return rows

    # ----- devices -----

    def devices(self, fleet: str | None) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._call("GET", "/api/devices", query={"fleet": fleet})
        return rows

    def device(self, device_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = self._call("GET", f"/api/devices/{_seg(device_id)}/summary")
        return doc

    # ----- alerts and audit -----

    def alerts(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._call("GET", "/api/alerts", query={"state": state, "limit": limit})
        return rows

    def loop_state(self, limit: int) -> dict[str, Any]:
        doc: dict[str, Any] = self._call("GET", "/api/loop")
        return {key: rows[:limit] for key, rows in doc.items()}

    def loop_answer(self, job_id: int, approve: bool) -> dict[str, Any]:
        doc: dict[str, Any] = self._call("POST", f"/api/loop/{job_id}/{'approve' if approve else 'reject'}")
        return doc

    def alert_ack(self, alert_id: int) -> dict[str, Any]:
        doc: dict[str, Any] = self._call("POST", f"/api/alerts/{alert_id}/ack")
        return doc

    def audit_entries(self, limit: int, action: str | None) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._call("GET", "/api/audit/entries", query={"limit": limit, "action": action})
        return rows

    def audit_verify(self) -> dict[str, Any]:
        doc: dict[str, Any] = self._call("GET", "/api/audit/verify")
        return doc

    # ----- users -----

    def users(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._call("GET", "/api/users")
        return rows

    def user_add(self, name: str, role: str) -> dict[str, Any]:
        doc: dict[str, Any] = self._call("POST", "/api/users", {"name": name, "role": role})
        return doc

    def user_rotate(self, name: str) -> dict[str, Any]:
        doc: dict[str, Any] = self._call("POST", f"/api/users/{_seg(name)}/rotate")
        return doc

    def user_revoke(self, name: str) -> dict[str, Any]:
        doc: dict[str, Any] = self._call("POST", f"/api/users/{_seg(name)}/revoke")
        return doc


def _seg(value: str) -> str:
    """One path segment, quoted (an id with '/' or '?' cannot reach another endpoint)."""
    return urllib.parse.quote(value, safe="@")
