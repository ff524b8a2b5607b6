"""The dashboard's HTTP API (FastAPI), the pages that use it, live updates (server-sent events) and /metrics.

Every request is made by a user (server/users.py) whose role grants permissions (server/roles.py): each endpoint
names the one it needs, and a user without it gets 403 and changes nothing. Reads need a user's token unless the
coordinator was told to open them (`dashboard_public_read`); every change needs it in an `Authorization: Bearer`
header — never a cookie alone, so another site cannot make a browser act. The token is looked up on each request,
so a revoked or rotated one is refused at once. What a user changes is audited under their name (`user:NAME`).
`fedfleet --server URL` (server/cli/remote.py) uses this API, so releases, assignments and rollouts can be run from
anywhere the coordinator's HTTPS reaches. The pages are static files bundled in this package: no CDN, nothing
fetched from the internet. OpenAPI's interactive pages load from a CDN, so they are off; the schema is served at
/api/openapi.json and the dashboard's API page lists it.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at runtime, and
# the `Read` and permission aliases are local to create_app.
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.control import Control
from server.dashboard import views
from server.dashboard.metrics import CoordinatorCollector
from server.datadir import DataDir
from server.errors import ConflictError, CoordinatorError, NotFoundError
from server.roles import GRANTS, Permission
from server.rollout.spec import RolloutSpec
from server.store import Store, now_ms
from server.store.dashboard import CHANGE_MARKS, DashboardReads
from server.users import User

__all__ = ["COOKIE", "DashboardOptions", "create_app"]

logger = logging.getLogger(__name__)

COOKIE = "fedfleet_token"
STATIC = Path(__file__).parent / "static"
FEED_SECONDS = 0.5  # how often the change feed looks at the store
HEARTBEAT_SECONDS = 15.0
# The pages load only what this server serves (scripts, the vendored chart library, styles) and talk only to it.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


@dataclass(frozen=True)
class DashboardOptions:
    # The operator token, or how to read it: read once at start so that the admin user `operator` holds it (the
    # upgrade from the single operator token); from then on every request's token is looked up in the users table.
    token: str | Callable[[], str]
    public_read: bool = False  # reads without a token (changes still need one)
    feed_seconds: float = FEED_SECONDS
    tls: bool = False  # served over HTTPS: the session cookie is Secure
    plaintext_exposures: tuple[str, ...] = ()  # accepted by --allow-plaintext-network: a banner on every page


class RetireBody(BaseModel):
    """A release retire. `confirm` must repeat the release's id."""

    confirm: str = Field(description="The release id again, as a confirmation.")


class RevokeBody(BaseModel):
    """A device's certificates revoked. `confirm` must repeat the device's id."""

    confirm: str = Field(description="The device id again, as a confirmation.")


class ActionBody(BaseModel):
    """An operator action. `confirm` must repeat the rollout's id: the page asks before it sends."""

    confirm: str = Field(description="The rollout id again, as a confirmation.")


class SessionBody(BaseModel):
    token: str = Field(min_length=1, max_length=200)


class ReleaseUpload(BaseModel):
    """A .tflite file to check against the policy, sign and publish (the same checks as `fedfleet release FILE`)."""

    name: str = Field(max_length=64, description="Model name, e.g. digits.")
    version: str = Field(max_length=64, description="Release version, e.g. 1.2.0.")
    model: str = Field(description="The .tflite file, base64.")
    probe: dict[str, Any] | None = Field(None, description="Probe set: encoded 'inputs' and 'outputs' arrays.")
    model_card: dict[str, Any] | None = Field(None, description="Model card, signed and checked by the policy.")


class AssignBody(BaseModel):
    release: str = Field(max_length=200, description="name@version")
    devices: list[str] = Field(default_factory=list, max_length=10_000, description="Device ids; or give fleet.")
    fleet: str | None = Field(None, max_length=200, description="Every registered device of this fleet.")


class UserBody(BaseModel):
    name: str = Field(max_length=64)
    role: str = Field(max_length=40, description="viewer, operator, release-manager, privacy-officer or admin")


class BudgetBody(BaseModel):
    epsilon: float = Field(ge=0, description="The device's lifetime ε budget.")


class LabelBody(BaseModel):
    fleet: str | None = Field(None, max_length=200, description="Move the device to this fleet.")
    labels: dict[str, str] | None = Field(None, description="Replace every label (an empty object removes them).")


class _Stores:
    """One store connection per worker thread (SQLite connections are not shared across threads here)."""

    def __init__(self, datadir: DataDir) -> None:
        self.datadir = datadir
        self._local = threading.local()
        self._all: list[Store] = []
        self._lock = threading.Lock()

    def get(self) -> Store:
        store: Store | None = getattr(self._local, "store", None)
        if store is None:
            store = self.datadir.store()
            self._local.store = store
            with self._lock:
                self._all.append(store)
        return store

    def close(self) -> None:
        with self._lock:
            for s in self._all:
                s.close()
            self._all.clear()


class ChangeFeed:
    """One poller for every live page: it reads a few cheap high-water marks and tells each subscriber which
    parts of the state moved."""

    QUERIES: ClassVar[dict[str, str]] = CHANGE_MARKS  # the topics and their marks' queries, kept by the store

    def __init__(self, stores: _Stores, seconds: float) -> None:
        self.stores = stores
        self.seconds = seconds
        self.subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._task: asyncio.Task[None] | None = None
        self._marks: dict[str, Any] = {}

    def marks(self) -> dict[str, Any]:
        return DashboardReads(self.stores.get()).change_marks()

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=100)
        self.subscribers.add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="dashboard-change-feed")
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self.subscribers.discard(queue)

    async def _run(self) -> None:
        self._marks = await asyncio.to_thread(self.marks)
        while self.subscribers:
            await asyncio.sleep(self.seconds)
            try:
                marks = await asyncio.to_thread(self.marks)
            except Exception:
                logger.exception("dashboard change feed could not read the store; retrying")
                continue
            changed = sorted(t for t in marks if marks[t] != self._marks.get(t))
            self._marks = marks
            if changed:
                message = {"changed": changed, "at": now_ms()}
                for queue in list(self.subscribers):
                    if queue.full():  # a stalled client: it will refetch everything on its next event anyway
                        queue.get_nowait()
                    queue.put_nowait(message)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


MAX_BODY_BYTES = 64 * 1024  # every request body the API takes is a small JSON object, but one:
UPLOAD_PATH = "/api/releases"  # a release upload: a base64 model up to UPLOAD_BODY_BYTES
UPLOAD_BODY_BYTES = 96 * 1024 * 1024  # a 64 MiB model, base64, with its card and probe set


class _BodyLimit:
    """Refuse (413) any request body over `limit` bytes (`upload_limit` for a release upload), declared or
    streamed, before the app reads it: the session endpoint takes requests from anyone, and a 50 MB body used to be
    held in memory. A body without a declared length is read here, up to the limit, and handed on whole."""

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int = UPLOAD_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit
        self.upload_limit = upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if scope["path"] == UPLOAD_PATH and scope["method"] == "POST" else self.limit
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > limit:
                await self._refuse(send, limit)
                return
            await self.app(scope, receive, send)  # the server holds the client to its declared length
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > limit:
                await self._refuse(send, limit)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def whole() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, whole, send)

    async def _refuse(self, send: Send, limit: int) -> None:
        body = json.dumps({"detail": f"request bodies are limited to {limit} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def create_app(
    datadir: DataDir, options: DashboardOptions, broker_connected: Callable[[], bool] | None = None
) -> FastAPI:
    """The dashboard over one data directory. `broker_connected` reports the coordinator's MQTT session for
    /metrics (None: not exported)."""
    operator_token = options.token() if callable(options.token) else options.token
    if not operator_token:
        raise CoordinatorError("the dashboard needs an operator token")
    config = datadir.config()
    stores = _Stores(datadir)
    with datadir.store() as store:
        datadir.users(store).adopt_operator(operator_token)  # the upgrade: the operator token is an admin's
    feed = ChangeFeed(stores, options.feed_seconds)
    registry = CollectorRegistry(auto_describe=False)
    freshness_ms = int(datadir.config().freshness_hours * 3_600_000)
    registry.register(CoordinatorCollector(stores.get, broker_connected, freshness_ms))

    def bearer(request: Request) -> str:
        header = request.headers.get("authorization", "")
        return header[7:].strip() if header.lower().startswith("bearer ") else ""

    def presented_token(request: Request) -> str:
        return bearer(request) or request.cookies.get(COOKIE, "")

    def signed_in(token: str) -> User | None:
        """The user holding this token, looked up now: a revoked or rotated token is refused at once."""
        return datadir.users(stores.get()).authenticate(token) if token else None

    def reader(request: Request) -> User | None:
        user = signed_in(presented_token(request))
        if user is None and not options.public_read:
            raise HTTPException(
                401,
                "this view needs a user's token (`fedfleet users add`, or `fedfleet dashboard-token` for the admin)",
                {"WWW-Authenticate": "Bearer"},
            )
        return user

    def needs(permission: Permission) -> Callable[[Request], User]:
        """A dependency: the user presenting a token in the Authorization header whose role grants `permission`."""
        allowed = " or ".join(str(r) for r, granted in GRANTS.items() if permission in granted)

        def check(request: Request) -> User:
            user = signed_in(bearer(request))
            if user is None:
                raise HTTPException(
                    401,
                    "changes need a user's token in an Authorization: Bearer header",
                    {"WWW-Authenticate": "Bearer"},
                )
            if str(permission) not in user.permissions:
                raise HTTPException(
                    403,
                    f"user {user.name} ({user.role}) lacks the {permission} permission, which the {allowed} role "
                    "grants; ask an admin",
                )
            return user

        return check

    Read = Annotated[User | None, Depends(reader)]
    RolloutsAct = Annotated[User, Depends(needs(Permission.ROLLOUTS_ACT))]
    AlertsAck = Annotated[User, Depends(needs(Permission.ALERTS_ACK))]
    LoopAnswer = Annotated[User, Depends(needs(Permission.LOOP_ANSWER))]
    Publish = Annotated[User, Depends(needs(Permission.RELEASES_PUBLISH))]
    Assign = Annotated[User, Depends(needs(Permission.ASSIGN))]
    RolloutsStart = Annotated[User, Depends(needs(Permission.ROLLOUTS_START))]
    PrivacyManage = Annotated[User, Depends(needs(Permission.PRIVACY_MANAGE))]
    UsersManage = Annotated[User, Depends(needs(Permission.USERS_MANAGE))]
    DevicesManage = Annotated[User, Depends(needs(Permission.DEVICES_MANAGE))]

    def control(user: User) -> Control:
        return Control(datadir, stores.get(), user.actor)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await feed.stop()
        stores.close()

    app = FastAPI(
        lifespan=lifespan,
        title="fedfleet coordinator",
        version="1",
        description="The API behind the fedfleet dashboard: fleet, rollouts, drift, training, privacy, audit.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served below, behind the same token as every read
    )

    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi(_: Read) -> dict[str, Any]:
        """The API's OpenAPI document: what a reader may call (needs the token unless public read is on)."""
        return app.openapi()

    @app.exception_handler(NotFoundError)
    async def not_found(_: Request, e: NotFoundError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, 404)

    @app.exception_handler(ConflictError)
    async def conflict(_: Request, e: ConflictError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, 409)

    @app.exception_handler(CoordinatorError)
    async def refused(_: Request, e: CoordinatorError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, 400)

    # ----- session -----

    def who(user: User | None) -> dict[str, Any]:
        if user is None:
            return {"user": None, "role": None, "permissions": [str(Permission.READ)] if options.public_read else []}
        return {"user": user.name, "role": str(user.role), "permissions": user.permissions}

    @app.get("/api/session", tags=["session"])
    def session(request: Request) -> dict[str, Any]:
        """Whether reads are open, who is signed in (user, role, and the permissions their role grants, by the names
        in server/roles.py), and what the coordinator exposes in plaintext beyond loopback (only ever non-empty
        under `serve --allow-plaintext-network`)."""
        user = signed_in(presented_token(request))
        return {
            "public_read": options.public_read,
            "authenticated": user is not None,
            **who(user),
            "plaintext_exposures": list(options.plaintext_exposures),
        }

    @app.post("/api/session", tags=["session"])
    def login(body: SessionBody, response: Response) -> dict[str, Any]:
        """Check a user's token and keep it in an HttpOnly cookie for this browser's reads."""
        user = signed_in(body.token)
        if user is None:
            raise HTTPException(401, "that token belongs to no user (or was revoked or rotated)")
        response.set_cookie(COOKIE, body.token, httponly=True, samesite="strict", secure=options.tls)
        return {"authenticated": True, **who(user)}

    @app.delete("/api/session", tags=["session"])
    def logout(response: Response) -> dict[str, Any]:
        response.delete_cookie(COOKIE)
        return {"authenticated": False}

    # ----- fleet -----

    @app.get("/api/fleet", tags=["fleet"])
    def fleet(
        _: Read,
        q: str = "",
        fleet: str = "",
        release: str = "",
        state: str = "",
        online: bool | None = None,
        label: Annotated[str, Query(description="key=value")] = "",
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        """Devices by release, state, presence and cohort, and one page of those matching the filter."""
        where_label = None
        if label:
            key, sep, value = label.partition("=")
            if not sep or not key:
                raise HTTPException(422, f"label {label!r} must look like key=value")
            where_label = (key, value)
        where = views.DeviceFilter(q, fleet, release, state, online, where_label)
        return views.fleet_view(stores.get(), where, limit, offset)

    @app.get("/api/status", tags=["fleet"])
    def fleet_status(_: Read) -> dict[str, Any]:
        """The fleet at a glance (`fedfleet status`): the coordinator, devices by release and update state, active
        rollouts, alerts not resolved, the largest lifetime ε against the budget."""
        return Control(datadir, stores.get(), "").status()

    @app.get("/api/devices", tags=["fleet"])
    def devices(_: Read, fleet: Annotated[str | None, Query(max_length=200)] = None) -> list[dict[str, Any]]:
        """Each device: fleet, labels, online state, assigned and running release (`fedfleet devices list`)."""
        return Control(datadir, stores.get(), "").devices(fleet)

    @app.get("/api/devices/{device_id}/summary", tags=["fleet"])
    def device_summary(_: Read, device_id: str) -> dict[str, Any]:
        """One device with its hardware and latest update events (`fedfleet devices show`)."""
        return Control(datadir, stores.get(), "").device(device_id)

    @app.put("/api/devices/{device_id}/placement", tags=["fleet"])
    def device_place(user: DevicesManage, device_id: str, body: LabelBody) -> dict[str, Any]:
        """Set a device's fleet or labels (`fedfleet devices label`); audited."""
        return control(user).place_device(device_id, body.fleet, body.labels)

    @app.post("/api/devices/{device_id}/revoke", tags=["fleet"])
    def device_revoke(user: DevicesManage, device_id: str, body: RevokeBody) -> dict[str, Any]:
        """Revoke a device's certificates (`fedfleet devices revoke`): gRPC refuses it at once, the broker after
        `fedfleet broker config` and a reload; 409, changing nothing, for a device with no live certificate."""
        if body.confirm != device_id:
            raise HTTPException(422, f"confirm must repeat the device id {device_id!r}")
        return control(user).revoke_device(device_id)

    @app.get("/api/devices/{device_id}", tags=["fleet"])
    def device(
        _: Read, device_id: str, limit: Annotated[int, Query(ge=1, le=1000)] = views.DEVICE_PAGE_WINDOWS
    ) -> dict[str, Any]:
        """One device: its state and timeline of assignments, update events and telemetry windows."""
        return views.device_view(stores.get(), device_id, limit, datadir.policy())

    # ----- rollouts -----

    @app.get("/api/rollouts", tags=["rollouts"])
    def rollouts(_: Read) -> list[dict[str, Any]]:
        return views.rollouts_view(datadir.rollouts(stores.get()))

    @app.get("/api/rollouts/{rollout_id}", tags=["rollouts"])
    def rollout(_: Read, rollout_id: str) -> dict[str, Any]:
        """Each wave's devices by state, the gates now and over time against their thresholds, every decision."""
        return views.rollout_view(datadir.rollouts(stores.get()), rollout_id)

    @app.get("/api/rollouts/{rollout_id}/status", tags=["rollouts"])
    def rollout_status(_: Read, rollout_id: str) -> dict[str, Any]:
        """The rollout as `fedfleet rollout status` shows it: waves, the gates judged now, every decision."""
        return datadir.rollouts(stores.get()).status(rollout_id)

    @app.post("/api/rollouts", tags=["rollouts"])
    def rollout_start(user: RolloutsStart, spec: dict[str, Any]) -> dict[str, Any]:
        """Start a rollout from a spec (the fields of a rollout spec TOML, as JSON); refused, naming every reason, if
        the policy or another rollout forbids it (`fedfleet rollout start`). Answers its status."""
        return control(user).rollout_start(RolloutSpec.from_json(spec))

    @app.post("/api/rollouts/{rollout_id}/{action}", tags=["rollouts"])
    def act(
        user: RolloutsAct, rollout_id: str, action: Literal["pause", "resume", "abort", "rollback"], body: ActionBody
    ) -> dict[str, Any]:
        """Pause, resume, abort or roll back, with the same authority as `fedfleet rollout ACTION`."""
        if body.confirm != rollout_id:
            raise HTTPException(422, f"confirm must repeat the rollout id {rollout_id!r}")
        return control(user).rollout_act(rollout_id, action)

    # ----- releases and assignments -----

    @app.post(UPLOAD_PATH, tags=["releases"])
    def release_upload(user: Publish, body: ReleaseUpload) -> dict[str, Any]:
        """Check a .tflite file against the policy, sign and publish it (`fedfleet release FILE`); the same bytes
        again change nothing, other bytes under an existing version are refused (409)."""
        try:
            data = base64.b64decode(body.model, validate=True)
        except (binascii.Error, ValueError) as e:
            raise HTTPException(422, "model must be the .tflite file in base64") from e
        return control(user).publish(data, body.name, body.version, body.probe, body.model_card)

    @app.post("/api/assignments", tags=["releases"])
    def assign(user: Assign, body: AssignBody) -> dict[str, Any]:
        """Issue signed assignments of a release to devices, or to every device of a fleet (`fedfleet assign`)."""
        if bool(body.devices) == (body.fleet is not None):
            raise HTTPException(422, "give devices or fleet, not both and not neither")
        return control(user).assign(body.release, body.devices, body.fleet)

    # ----- the loop: alerts, drift alarms, retrain jobs -----

    @app.get("/api/alerts", tags=["loop"])
    def alerts_list(
        _: Read,
        state: Literal["open", "acknowledged", "resolved", ""] = "",
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        """Alerts, newest first, with their webhook deliveries (the same as `fedfleet alerts list`)."""
        return Control(datadir, stores.get(), "").alerts(state or None, limit)

    @app.post("/api/alerts/{alert_id}/ack", tags=["loop"])
    def alerts_ack(user: AlertsAck, alert_id: int) -> dict[str, Any]:
        """Acknowledge an open alert (`fedfleet alerts ack`)."""
        return control(user).alert_ack(alert_id)

    @app.get("/api/loop", tags=["loop"])
    def loop_state(_: Read) -> dict[str, Any]:
        """Drift alarms and retrain jobs, newest first (`fedfleet loop status`)."""
        return Control(datadir, stores.get(), "").loop_state(50)

    @app.post("/api/loop/{job_id}/{answer}", tags=["loop"])
    def loop_answer(user: LoopAnswer, job_id: int, answer: Literal["approve", "reject"]) -> dict[str, Any]:
        """Approve or reject a proposed retraining (`fedfleet loop approve|reject`)."""
        return control(user).loop_answer(job_id, answer == "approve")

    # ----- drift, training, privacy, models, audit -----

    @app.get("/api/drift", tags=["drift"])
    def drift(
        _: Read,
        cohort_by: Annotated[str, Query(max_length=100, description="'fleet' or a label key")] = "fleet",
        minutes: Annotated[float, Query(gt=0, le=7 * 24 * 60)] = 30.0,
        buckets: Annotated[int, Query(ge=1, le=200)] = 30,
        release: str = "",
    ) -> dict[str, Any]:
        """PSI per cohort, release and feature over time, and the prediction-score PSI."""
        store = stores.get()
        if release:
            store.release(release)  # an unknown release is a 404, not an empty chart
        return views.drift_view(store, cohort_by, minutes, buckets, release, datadir.policy())

    @app.get("/api/training", tags=["training"])
    def training(_: Read) -> list[dict[str, Any]]:
        """Training runs, newest first, with their rounds (accuracy, loss, ε)."""
        return views.training_view(stores.get())

    @app.get("/api/training/{run_id}", tags=["training"])
    def training_run(_: Read, run_id: str) -> dict[str, Any]:
        return views.training_run_view(stores.get(), run_id)

    @app.get("/api/privacy", tags=["training"])
    def privacy(_: Read) -> dict[str, Any]:
        """The privacy ledger: per device lifetime ε against its budget, and the spend per run; and per device the
        monitoring budget of its noised telemetry windows (ε spent, budget, exhausted), when any device sent one."""
        return views.ledger_view(stores.get(), config.epsilon_budget)

    @app.get("/api/privacy/ledger", tags=["training"])
    def privacy_ledger(
        user: PrivacyManage,
        device: Annotated[str | None, Query(max_length=200, description="Only this device's rows.")] = None,
    ) -> list[dict[str, Any]]:
        """Every ledger row: ε and δ per device, run and purpose, with lifetime, budget and whether the device
        consented to the run (`fedfleet privacy ledger`): an export for the privacy officer, so it needs the
        privacy.manage permission."""
        return control(user).privacy_ledger(device)

    @app.get("/api/privacy/monitoring", tags=["training"])
    def privacy_monitoring(
        user: PrivacyManage,
        device: Annotated[str | None, Query(max_length=200, description="Only this device.")] = None,
    ) -> list[dict[str, Any]]:
        """The monitoring ledger per device: ε spent on noised telemetry windows as the coordinator stored them,
        the device's own spend and budget, windows, whether the budget is exhausted, when the newest window arrived
        (`fedfleet privacy monitoring`); an export for the privacy officer, so it needs the privacy.manage
        permission. A device neither registered nor in the monitoring ledger is a 404."""
        return control(user).privacy_monitoring(device)

    @app.get("/api/privacy/consent", tags=["training"])
    def privacy_consent(user: PrivacyManage) -> list[dict[str, Any]]:
        """Each device's current consent to training (granted, withdrawn or unknown), when it was recorded and its
        source (`agent`: the owner's agent.toml; `user:NAME`), by device (`fedfleet privacy consent`). Consent
        records are personal data: only the privacy-officer and admin roles (privacy.manage) may read them."""
        return control(user).consent()

    @app.get("/api/privacy/consent/{device_id}", tags=["training"])
    def privacy_consent_history(user: PrivacyManage, device_id: str) -> dict[str, Any]:
        """One device's consent now and every statement recorded for it, oldest first (`fedfleet privacy consent
        --device ID`); needs privacy.manage. A device neither registered nor with a statement is a 404."""
        return control(user).consent_history(device_id)

    @app.put("/api/privacy/budgets/{device_id}", tags=["training"])
    def privacy_budget(user: PrivacyManage, device_id: str, body: BudgetBody) -> dict[str, Any]:
        """Set one device's lifetime ε budget (`fedfleet privacy budget`); audited. An unknown device is a 404."""
        return control(user).set_budget(device_id, body.epsilon)

    @app.get("/api/models", tags=["training"])
    def models(_: Read) -> list[dict[str, Any]]:
        """Model versions, newest first: run, parent, ε, test accuracy (`fedfleet models list`)."""
        return Control(datadir, stores.get(), "").models()

    @app.get("/api/models/{version}", tags=["training"])
    def model(_: Read, version: str) -> dict[str, Any]:
        """A model version's card (JSON, Markdown, and HTML with raw HTML escaped), generated from its lineage, the
        lineage and its run's incidents (`fedfleet models show`)."""
        doc = Control(datadir, stores.get(), "").model(version)
        return {**doc, "card_html": views.render_markdown(doc["card_markdown"])}

    @app.get("/api/releases", tags=["releases"])
    def releases(_: Read) -> list[dict[str, Any]]:
        """Releases, newest first: source (trained version or file), created and retired, devices running each, its
        rollouts (the same as `fedfleet releases list`)."""
        return Control(datadir, stores.get(), "").releases()

    @app.post("/api/releases/{release_id}/retire", tags=["releases"])
    def release_retire(user: Publish, release_id: str, body: RetireBody) -> dict[str, Any]:
        """Take a release out of the update repository (`fedfleet releases retire`); refused (409), changing
        nothing, while a device runs or is assigned it or a live rollout could roll back to it."""
        if body.confirm != release_id:
            raise HTTPException(422, f"confirm must repeat the release id {release_id!r}")
        return control(user).release_retire(release_id)

    @app.get("/api/releases/{release_id}", tags=["releases"])
    def release(_: Read, release_id: str) -> dict[str, Any]:
        """One release and its model card, the Markdown also rendered with raw HTML escaped (`fedfleet releases
        show`)."""
        doc = Control(datadir, stores.get(), "").release(release_id)
        return {**doc, "card_html": views.render_markdown(doc["card_markdown"])}

    @app.get("/api/audit", tags=["audit"])
    def audit_trail(
        _: Read, limit: Annotated[int, Query(ge=1, le=5000)] = 200, action: Annotated[str, Query(max_length=100)] = ""
    ) -> dict[str, Any]:
        """The newest audit entries and whether the whole hash chain verifies."""
        return views.audit_view(stores.get(), limit, action)

    @app.get("/api/audit/entries", tags=["audit"])
    def audit_entries(
        _: Read, limit: Annotated[int, Query(ge=1, le=5000)] = 50, action: Annotated[str, Query(max_length=100)] = ""
    ) -> list[dict[str, Any]]:
        """Audit entries, newest first (`fedfleet audit list`)."""
        return Control(datadir, stores.get(), "").audit_entries(limit, action or None)

    @app.get("/api/audit/verify", tags=["audit"])
    def audit_verify(_: Read) -> dict[str, Any]:
        """Walk the hash chain: how many entries, whether intact, every problem (`fedfleet audit verify`)."""
        return Control(datadir, stores.get(), "").audit_verify()

    # ----- users -----

    @app.get("/api/users", tags=["users"])
    def users_list(_: UsersManage) -> list[dict[str, Any]]:
        """Users with their role and whether they may sign in; never a token (`fedfleet users list`)."""
        return Control(datadir, stores.get(), "").users()

    @app.post("/api/users", tags=["users"])
    def users_add(user: UsersManage, body: UserBody) -> dict[str, Any]:
        """Add a user; the answer holds their token, shown only this once (`fedfleet users add`)."""
        return control(user).user_add(body.name, body.role)

    @app.post("/api/users/{name}/rotate", tags=["users"])
    def users_rotate(user: UsersManage, name: str) -> dict[str, Any]:
        """A new token for a user (shown only in this answer); the old one is refused from now on."""
        return control(user).user_rotate(name)

    @app.post("/api/users/{name}/revoke", tags=["users"])
    def users_revoke(user: UsersManage, name: str) -> dict[str, Any]:
        """Revoke a user: their token is refused from the next request on."""
        return control(user).user_revoke(name)

    # ----- live updates and metrics -----

    @app.get("/api/stream", tags=["live"])
    async def stream(_: Read, request: Request) -> StreamingResponse:
        """Server-sent events: `change` with the parts of the state that moved (rollouts, devices, events,
        telemetry, audit, training); the page refetches what it shows."""

        async def events() -> AsyncIterator[str]:
            queue = feed.subscribe()
            try:
                yield f"event: hello\ndata: {json.dumps({'at': now_ms()})}\n\n"
                while not await request.is_disconnected():
                    try:
                        message = await asyncio.wait_for(queue.get(), HEARTBEAT_SECONDS)
                    except TimeoutError:
                        yield ": heartbeat\n\n"
                        continue
                    yield f"event: change\ndata: {json.dumps(message)}\n\n"
            finally:
                feed.unsubscribe(queue)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.get("/metrics", tags=["live"])
    def metrics(_: Read) -> Response:
        """Prometheus text format: devices, update events, telemetry, rollouts and gates, training, broker."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # ----- pages -----

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        headers = {"Cache-Control": "no-store", "Content-Security-Policy": CONTENT_SECURITY_POLICY}
        return FileResponse(STATIC / "index.html", headers=headers)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
