"""Users and roles against a real `fedfleet serve`: for each role, one real HTTP request per permission. An allowed
request does what it says; a refused one answers 403 and changes nothing; the audit trail names the user; a revoked
token is refused at the next request."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from server import audit
from server.datadir import DataDir
from server.fl.registry import Ledger
from server.loop.alerts import Alerts
from server.loop.kinds import AlertKind
from server.roles import GRANTS, Permission, Role
from server.store.loop import AlarmRecords, AlertRecords, JobRecords
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers
from tests.support import CoordinatorProcess, fedfleet, wait_for

pytestmark = pytest.mark.slow

ROLES = list(Role)


def call(url: str, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
    """One request as the holder of `token`: (status, JSON answer)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    request = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@dataclass
class Rig:
    d: DataDir
    url: str
    tokens: dict[Role, str]
    rollout: str

    def store_read(self, read: Callable[[Any], Any]) -> Any:
        with self.d.store() as store:
            return read(store)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    d, _ = DataDir.init(tmp_path_factory.mktemp("roles") / "data")
    models = [build_dense_model(random_dense_layers([64, 32, 10], seed)) for seed in (1, 2)]
    with d.store() as store:
        for version, data in zip(("1.0.0", "2.0.0"), models, strict=True):
            publish_release(d.repository(), store, data, "digits", version)
        devices = ["pi-0", "pi-1", *(f"rm-{r}" for r in ROLES)]
        for name in devices:
            fleet = name if name.startswith("rm-") else "lab"  # a fleet per role for its own rollout start
            store.register_device(name, fleet, {}, {}, "t")
        d.director().assign(store, devices, store.release("digits@1.0.0"))
    tokens = {}
    for role in ROLES:
        added = fedfleet(d, "users", "add", f"u-{role}", "--role", str(role), "--json")
        assert added.returncode == 0, added.stderr
        tokens[role] = json.loads(added.stdout)["token"]
    coordinator = CoordinatorProcess(d, mqtt_url=None).start()
    try:
        url = coordinator.endpoints["dashboard"]
        spec = {"release": "digits@2.0.0", "fleet": "lab", "canary": 1, "bake_seconds": 3600}
        status, doc = call(url, "POST", "/api/rollouts", tokens[Role.ADMIN], spec)
        assert status == 200, doc
        yield Rig(d, url, tokens, doc["id"])
    finally:
        coordinator.kill()


def _open_alert(rig: Rig, n: str) -> int:
    def raise_(store: Any) -> int:
        alert = Alerts(store).raise_alert(AlertKind.DEVICES_SILENT, "lab", f"test:{n}", "a test alert")
        assert alert is not None
        return alert

    return int(rig.store_read(raise_))


def _proposal(rig: Rig, role: Role) -> int:
    def create(store: Any) -> int:  # one open alarm per fleet and release: the role's own fleet
        fleet = f"rm-{role}"
        alarm = AlarmRecords(store).open(fleet, "digits@1.0.0", "input_max_psi", 0.2, 0.5, 1, "review", 0)
        return JobRecords(store).create(alarm, fleet, "digits@1.0.0", "test", "simulation", "proposed")

    return int(rig.store_read(create))


@dataclass(frozen=True)
class Check:
    """One permission's request: `prepare` makes what it acts on, `request` is (method, path, body), `observe`
    reads the state the request would change."""

    prepare: Callable[[Rig, Role], Any]
    request: Callable[[Rig, Role, Any], tuple[str, str, Any]]
    observe: Callable[[Rig, Any], Any]


def _phase(rig: Rig, _: Any) -> Any:
    return rig.store_read(lambda s: rig.d.rollouts(s).status(rig.rollout, observe=False)["phase"])


CHECKS: dict[Permission, Check] = {
    Permission.READ: Check(lambda r, role: None, lambda r, role, x: ("GET", "/api/fleet", None), lambda r, x: None),
    Permission.ROLLOUTS_ACT: Check(
        # A resumed rollout is pending until the coordinator's tick bakes it again: observed before that, a change
        # of phase the tick makes would look like the refused request's doing.
        lambda r, role: wait_for(lambda: _phase(r, None) == "baking", 60, what="the rollout baking again"),
        lambda r, role, x: ("POST", f"/api/rollouts/{r.rollout}/pause", {"confirm": r.rollout}),
        _phase,
    ),
    Permission.ALERTS_ACK: Check(
        lambda r, role: _open_alert(r, str(role)),
        lambda r, role, alert: ("POST", f"/api/alerts/{alert}/ack", None),
        lambda r, alert: r.store_read(lambda s: AlertRecords(s).get(alert)["state"]),
    ),
    Permission.RELEASES_PUBLISH: Check(
        lambda r, role: None,
        lambda r, role, x: (
            "POST",
            "/api/releases",
            {"name": f"up-{role}", "version": "1.0.0", "model": _model_b64()},
        ),
        lambda r, x: r.store_read(lambda s: [rel.id for rel in s.releases()]),
    ),
    Permission.ASSIGN: Check(
        lambda r, role: None,
        lambda r, role, x: ("POST", "/api/assignments", {"release": "digits@2.0.0", "devices": ["pi-1"]}),
        lambda r, x: r.store_read(lambda s: s.highest_counters(["pi-1"])),
    ),
    Permission.ROLLOUTS_START: Check(
        lambda r, role: None,
        lambda r, role, x: ("POST", "/api/rollouts", {"release": "digits@2.0.0", "fleet": f"rm-{role}"}),
        lambda r, x: r.store_read(lambda s: len(r.d.rollouts(s).list())),
    ),
    Permission.LOOP_ANSWER: Check(
        _proposal,
        lambda r, role, job: ("POST", f"/api/loop/{job}/reject", None),
        lambda r, job: r.store_read(lambda s: JobRecords(s).get(job)["state"]),
    ),
    Permission.PRIVACY_MANAGE: Check(
        lambda r, role: None,
        lambda r, role, x: ("PUT", "/api/privacy/budgets/pi-0", {"epsilon": 3.0 + ROLES.index(role)}),
        lambda r, x: r.store_read(lambda s: Ledger(s, 10.0).budget("pi-0")),
    ),
    Permission.USERS_MANAGE: Check(
        lambda r, role: None,
        lambda r, role, x: ("POST", "/api/users", {"name": f"made-by-{role}", "role": "viewer"}),
        lambda r, x: r.store_read(lambda s: [u["name"] for u in r.d.users(s).list()]),
    ),
    Permission.DEVICES_MANAGE: Check(
        lambda r, role: None,
        lambda r, role, x: ("PUT", "/api/devices/pi-1/placement", {"labels": {"by": str(role)}}),
        lambda r, x: r.store_read(lambda s: s.device("pi-1")["labels"]),
    ),
}


_MODEL: list[str] = []


def _model_b64() -> str:
    import base64

    if not _MODEL:
        _MODEL.append(base64.b64encode(build_dense_model(random_dense_layers([64, 16, 10], 7))).decode())
    return _MODEL[0]


def _audit_head(rig: Rig) -> Any:
    return rig.store_read(lambda s: audit.entries(s, 1)[0]["seq"])


def _actors_after(rig: Rig, seq: int) -> list[str]:
    """Who wrote the audit entries after `seq`."""
    return [e["actor"] for e in rig.store_read(lambda s: audit.entries(s, 100)) if e["seq"] > seq]


@pytest.mark.parametrize("role", ROLES, ids=str)
def test_each_role_may_do_what_it_grants_and_nothing_else(rig: Rig, role: Role) -> None:
    token = rig.tokens[role]
    for permission, check in CHECKS.items():
        subject = check.prepare(rig, role)
        before, seq_before = check.observe(rig, subject), _audit_head(rig)
        method, path, body = check.request(rig, role, subject)
        status, doc = call(rig.url, method, path, token, body)
        if permission in GRANTS[role]:
            assert status == 200, (role, permission, doc)
            if permission is not Permission.READ:
                assert check.observe(rig, subject) != before, (role, permission)
                assert f"user:u-{role}" in _actors_after(rig, seq_before), (role, permission)
            if permission is Permission.ROLLOUTS_ACT:  # give the next role a baking rollout again
                resumed, _ = call(
                    rig.url, "POST", f"/api/rollouts/{rig.rollout}/resume", token, {"confirm": rig.rollout}
                )
                assert resumed == 200
        else:
            assert status == 403, (role, permission, status, doc)
            assert f"lacks the {permission} permission" in doc["detail"] and "\n" not in doc["detail"]
            assert check.observe(rig, subject) == before, (role, permission)
            assert f"user:u-{role}" not in _actors_after(rig, seq_before), (role, permission)


def test_session_names_the_user_role_and_permissions(rig: Rig) -> None:
    for role in ROLES:
        status, doc = call(rig.url, "GET", "/api/session", rig.tokens[role])
        assert status == 200
        assert (doc["authenticated"], doc["user"], doc["role"]) == (True, f"u-{role}", str(role))
        assert set(doc["permissions"]) == {str(p) for p in GRANTS[role]}
    status, doc = call(rig.url, "GET", "/api/session", "not-a-token")
    assert (doc["authenticated"], doc["user"], doc["permissions"]) == (False, None, [])


def test_a_viewer_cannot_pause_a_rollout(rig: Rig) -> None:
    added = fedfleet(rig.d, "users", "add", "alice", "--role", "viewer", "--json")
    alice = json.loads(added.stdout)["token"]
    wait_for(lambda: _phase(rig, None) == "baking", 60, what="the rollout's canary to bake")  # the rig starts it
    before = _phase(rig, None)
    status, doc = call(rig.url, "POST", f"/api/rollouts/{rig.rollout}/pause", alice, {"confirm": rig.rollout})
    assert status == 403 and "alice (viewer) lacks the rollouts.act permission" in doc["detail"]
    assert _phase(rig, None) == before == "baking"


def test_a_revoked_or_rotated_token_is_refused_at_once(rig: Rig) -> None:
    added = json.loads(fedfleet(rig.d, "users", "add", "bob", "--role", "operator", "--json").stdout)
    assert call(rig.url, "GET", "/api/fleet", added["token"])[0] == 200
    rotated = json.loads(fedfleet(rig.d, "users", "rotate", "bob", "--json").stdout)
    assert call(rig.url, "GET", "/api/fleet", added["token"])[0] == 401
    assert call(rig.url, "GET", "/api/fleet", rotated["token"])[0] == 200
    assert fedfleet(rig.d, "users", "revoke", "bob").returncode == 0
    status, _ = call(rig.url, "POST", f"/api/rollouts/{rig.rollout}/pause", rotated["token"], {"confirm": rig.rollout})
    assert status == 401 and _phase(rig, None) == "baking"
    assert call(rig.url, "GET", "/api/fleet", rotated["token"])[0] == 401


def test_the_operator_token_signs_in_as_the_admin_operator(rig: Rig) -> None:
    _, doc = call(rig.url, "GET", "/api/session", rig.d.operator_token())
    assert (doc["user"], doc["role"]) == ("operator", "admin")
    assert set(doc["permissions"]) == {str(p) for p in Permission}
