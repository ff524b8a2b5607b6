"""The running agent: one asyncio task set per device, so one process can hold many simulated devices.

- MQTT: retained status (last will: offline), subscribes to its retained desired state and its telemetry
  acknowledgements, publishes update events (QoS 1).
- gRPC: registration (which also returns the current assignment and freshness statement), the periodic
  freshness check, TUF metadata, target bytes, and events when MQTT is down.
- Updates run one at a time in a worker thread; a newer assignment that arrives meanwhile replaces any
  queued one (latest wins), but nothing that fails the director's signature, or names a lower counter,
  displaces a verified one (a flood of garbage on the retained desired topic cannot push a real assignment
  out). The model that applications use is swapped by reference after a commit, so an inference in flight
  finishes on the model it started with.
- Freshness: the director's statement "your latest assignment is counter N, until T" arrives with Register,
  from a check on a timer with jitter (a quarter of the statement's validity, at most 15 minutes, which also
  returns the latest assignment if the device lacks it: an update arrives even when MQTT brings none), and
  pushed on MQTT (a statement above the device's counter starts a check at once). Without an unexpired
  statement the device is stale: said in its status, once as an event, and again when it is fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import grpc
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import DecodeError

from edge_agent import __version__
from edge_agent.assignment import VerifiedFreshness, load_director_keys, verify_assignment
from edge_agent.config import AgentConfig
from edge_agent.contract import LIMITS, Topics
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2_grpc as pb_grpc
from edge_agent.contract.drift import DriftReference
from edge_agent.contract.mqtt_session import aiomqtt_session, jittered, keep_session, publish, raise_lost_cancel
from edge_agent.contract.reasons import Reason
from edge_agent.contract.schema import InputSchema
from edge_agent.contract.windows import ClosedWindow
from edge_agent.errors import AgentError, AssignmentError, InterpreterError
from edge_agent.outbox import Outbox
from edge_agent.runtime import Model, interpreter_name, load_model
from edge_agent.state import AgentState, MonitoringBudget, SlotInfo, StateStore
from edge_agent.systemd import notify as systemd_notify
from edge_agent.systemd import watchdog_interval
from edge_agent.telemetry import TelemetryRecorder, WindowPrivacy
from edge_agent.transport import GrpcTransport
from edge_agent.updater import Outcome, UpdateContext, UpdateResult, accept_freshness, apply_assignment

__all__ = ["Agent", "Inference"]

logger = logging.getLogger(__name__)

_MAX_BACKOFF = 60.0
_RECONNECT_SPREAD_STEPS = 5  # after a lost MQTT session, reconnects wait anywhere in 5 first back-off steps (10 s)
_MAX_QUEUED_EVENTS = 1000
_EVENT_LINGER_SECONDS = 0.25  # events queued within this of each other go in one MQTT message
_START_STATUS_SECONDS = 1.0  # an update's "updating" status goes out with its first events, or after this at most
_EVENTS_PER_MESSAGE = 16  # at most; each event is under 1 KiB, so a message stays under mqtt_control_payload
_STOP_SECONDS = 5.0  # how long a stopping agent waits for its tasks to finish
_MAX_CHECK_SECONDS = 900.0  # the freshness check runs at least this often (a quarter of the validity, if shorter)
_MIN_CHECK_SECONDS = 0.5
_FIRST_STATEMENT_GRACE_MS = 600_000  # a device that never held a statement is stale after this long without one


def _one_message(events: list[pb.UpdateEvent]) -> bytes:
    """The first event carrying the ones that followed it in `later` (the wire contract's one level), cut short
    of events that would take the message past LIMITS.mqtt_control_payload (they go in the next one)."""
    first = pb.UpdateEvent()
    first.CopyFrom(events[0])
    first.later.extend(events[1:])
    while len(first.later) and first.ByteSize() > LIMITS.mqtt_control_payload:
        first.later.pop()
    del events[1 + len(first.later) :]
    return first.SerializeToString()


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Inference:
    output: np.ndarray
    release_id: str
    latency_ms: float


class _LocalService(pb_grpc.AgentLocalServicer):
    """The device-local Infer endpoint; it calls the same Python API applications use."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    async def Infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.InferResponse:
        x = np.asarray(request.input, dtype=np.float32)
        try:
            result = await asyncio.to_thread(self._agent.run_inference, x)
        except InterpreterError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except ValueError as e:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"input of {x.size} values does not fit the model: {e}"
            )
        return pb.InferResponse(
            output=result.output.ravel().tolist(), release_id=result.release_id, latency_ms=result.latency_ms
        )


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.topics = Topics(config.topic_prefix)
        self.store = StateStore(config.state_dir)
        self.store.remove_stale_temp_files()
        self.store.seed_trust_root(config.trust_root)
        self.director_keys = self._trusted_director_keys()
        self.interpreter = interpreter_name(config.interpreter)
        self.model: Model | None = None
        self.updating = False
        self.connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._desired: bytes | None = None
        self._applying: bytes | None = None  # the assignment the update worker has in hand
        self._desired_ready = asyncio.Event()
        self._events: deque[pb.UpdateEvent] = deque(maxlen=_MAX_QUEUED_EVENTS)
        self._events_ready = asyncio.Event()
        self._events_lock = asyncio.Lock()  # one sender at a time: the sender task, or a status publish
        self._status_due = False  # a status lingers with the events (`_status_soon`); any status publish clears it
        tls = config.tls.read() if config.tls is not None and config.grpc_tls else None
        self._transport = GrpcTransport(config.grpc_target, config.device_id, tls=tls)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started_ms = int(time.time() * 1000)
        self._check_now = asyncio.Event()  # a pushed statement arrived, or a check is wanted at once
        self._registered = asyncio.Event()  # Register answered: checks can succeed
        self._pushed_freshness: bytes | None = None
        self._ctx = UpdateContext(
            device_id=config.device_id,
            store=self.store,
            transport=self._transport,
            director_keys=self.director_keys,
            emit=self._emit,
            interpreter=config.interpreter,
            model_options=config.model_options,
            step=self._pause_hook,
            offer=self._offer_threadsafe,
            mirrors=config.mirrors,
            mirror_ca=config.mirror_ca,
        )
        self.outbox = Outbox(config.state_dir / "outbox.db", config.device_id, config.outbox_cap)
        privacy = None
        if config.dp_epsilon_per_window is not None:
            budget = MonitoringBudget(config.state_dir / "monitoring.json", config.monitoring_budget_epsilon)
            privacy = WindowPrivacy(config.dp_epsilon_per_window, budget)
            logger.info(
                "telemetry windows noised at ε %g each, one every %g s; monitoring budget ε %g, %g left",
                config.dp_epsilon_per_window,
                config.telemetry_every_seconds,
                budget.budget,
                budget.remaining(),
            )
        self.recorder = TelemetryRecorder(
            self._window_closed, config.telemetry_every_inferences, config.telemetry_every_seconds, privacy=privacy
        )
        self._telemetry_ready = asyncio.Event()
        self._sent_at: dict[int, float] = {}  # sequence -> when it went out over MQTT in this session
        self._model_release = ""
        # One lock per inference: it serializes the served interpreter (not thread-safe), keeps a model swap from
        # splitting an inference from its record, and guards the recorder's counts.
        self._serving = self.recorder.lock
        self._load_committed_model()

    # ----- what applications use -----

    @property
    def running_release(self) -> str:
        """The release applications are served by ("" before the first commit)."""
        return self._model_release

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Run the committed model on one input (the Python API for applications on the device)."""
        return self.run_inference(x).output

    def run_inference(self, x: np.ndarray) -> Inference:
        """Run the committed model; every inference feeds the current telemetry window.

        Inference and its record happen under the serving lock (the recorder's) that a model swap also takes, so
        an inference in flight finishes on the model it started with and is counted in that release's window.
        The interpreter must serialize calls anyway, so the lock costs no throughput.
        """
        with self._serving:
            model, release = self.model, self._model_release
            if model is None:
                raise InterpreterError("no committed model yet", Reason.NO_MODEL)
            start = time.perf_counter()
            try:
                y = model.predict_serialized(x)
            except Exception:
                self.recorder.record_error()
                raise
            latency = (time.perf_counter() - start) * 1000.0
            self.recorder.record_one(release, x, y, latency)  # copied into the recorder's buffer
        return Inference(y, release, latency)

    def _activate(self, model: Model, info: SlotInfo | None) -> None:
        """Make a committed model the one applications use, and start its telemetry windows."""
        release_id = info.release_id if info else ""
        doc = info.custom.get("drift_reference") if info else None
        n_classes = int(np.prod(model.interpreter.get_output_details()[0]["shape"][1:]))
        try:
            reference = DriftReference.from_metadata(doc) if doc else DriftReference.empty(n_classes)
        except ValueError as e:
            logger.warning("release %s has an unusable drift reference (%s); counting without it", release_id, e)
            reference = DriftReference.empty(n_classes)
        schema_doc = (info.custom.get("schema") or {}).get("input") if info else None
        try:
            schema = InputSchema.from_metadata(schema_doc) if schema_doc else None
        except ValueError as e:
            logger.warning("release %s has an unusable input schema (%s); inputs go unchecked", release_id, e)
            schema = None
        with self._serving:
            self.recorder.switch(release_id, reference, schema)
            self.model, self._model_release = model, release_id

    def _window_closed(self, window: ClosedWindow) -> None:
        """Called by the recorder (any thread): store first, then nudge the sender."""
        self.outbox.append(window)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._telemetry_ready.set)

    # ----- lifecycle -----

    async def run(self) -> None:
        """Run until cancelled: register, keep an MQTT session, apply assignments."""
        self._loop = asyncio.get_running_loop()
        pending = self.store.load().pending
        if pending:
            logger.info("resuming the update interrupted by a restart")
            self._offer(bytes.fromhex(pending))
        tasks = [
            asyncio.create_task(self._register_loop(), name="register"),
            asyncio.create_task(self._mqtt_loop(), name="mqtt"),
            asyncio.create_task(self._update_worker(), name="updates"),
            asyncio.create_task(self._freshness_loop(), name="freshness"),
            asyncio.create_task(self._event_sender(), name="events"),
            asyncio.create_task(self._telemetry_sender(), name="telemetry"),
            asyncio.create_task(self._window_timer(), name="windows"),
        ]
        if self.config.local_endpoint != "off":
            tasks.append(asyncio.create_task(self._serve_local(), name="local-endpoint"))
        if (interval := watchdog_interval()) is not None:
            tasks.append(asyncio.create_task(self._watchdog(interval), name="watchdog"))
        systemd_notify("READY=1")
        try:
            # wait, not gather: cancelling run() must leave the session up until "offline" is said below.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            # A clean stop sends no last will: say "offline" ourselves, briefly, so the fleet view stays true.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self.publish_status(online=False), 2.0)
            for t in tasks:
                t.cancel()
            # Bounded: a broker that never answers the MQTT DISCONNECT must not hold a stopping agent.
            _, stuck = await asyncio.wait(tasks, timeout=_STOP_SECONDS)
            if stuck:
                logger.warning("stopping without waiting for %s", ", ".join(t.get_name() for t in stuck))
            self.recorder.close()  # the open window's counts are kept for the next start
            await asyncio.to_thread(self._transport.close)
            self.outbox.close()

    def _trusted_director_keys(self) -> dict[str, Ed25519PublicKey]:
        """The director keys learned through TUF after a rotation, else the enrollment bundle's."""
        learned = self.store.director_keys_path
        if learned.exists():
            try:
                return load_director_keys(json.loads(learned.read_text()))
            except (ValueError, AttributeError, AgentError) as e:
                logger.warning("ignoring %s (%s); using the enrollment bundle's director keys", learned, e)
        return load_director_keys(self.config.director_keys)

    def _load_committed_model(self) -> None:
        state = self.store.load()
        if state.active is None:
            return
        info = state.active_info
        try:
            path = self.store.model_path(state.active)
            model = load_model(path, self.config.interpreter, self.config.model_options)
            self._activate(model, info)
        except InterpreterError as e:
            logger.error("committed model does not load: %s", e)

    def _offer(self, payload: bytes) -> None:
        """Queue an assignment; a newer one replaces any still waiting (latest wins). One that does not verify,
        or names a lower counter, does not displace a verified one (it is refused when nothing better waits)."""
        queued = self._desired
        if queued is not None and queued != payload and (held := self._counter_of(queued)) is not None:
            incoming = self._counter_of(payload)
            if incoming is None or incoming < held:
                logger.info("keeping queued assignment %d over an unverified or older one", held)
                return
        self._desired = payload
        self._desired_ready.set()

    def _offer_threadsafe(self, payload: bytes) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._offer, payload)

    def _counter_of(self, payload: bytes) -> int | None:
        """The counter of an assignment the director signed for this device; None if it does not verify."""
        try:
            return verify_assignment(payload, self.director_keys, self.config.device_id).counter
        except AssignmentError:
            return None

    # ----- registration -----

    async def _register_loop(self) -> None:
        delay = self.config.retry_seconds
        while True:
            try:
                response = await asyncio.to_thread(
                    self._transport.register,
                    self.config.fleet,
                    self.config.labels,
                    self.interpreter,
                    self.config.consent_training,
                )
            except AgentError as e:
                logger.warning("registration failed, retrying within %.0f s: %s", delay, e)
                await asyncio.sleep(jittered(delay))
                delay = min(delay * 2, _MAX_BACKOFF)
                continue
            if response.HasField("freshness"):
                await asyncio.to_thread(self._accept_statement, response.freshness)
            if response.HasField("assignment"):
                self._offer(response.assignment.SerializeToString())
            logger.info("registered as %s", self.config.device_id)
            self._registered.set()
            # A status published before the coordinator knew this device was refused: say it again.
            await self.publish_status()
            return

    # ----- MQTT -----

    def _status(self, online: bool = True) -> pb.DeviceStatus:
        state = self.store.load()
        info = state.active_info
        if self.updating:
            update_state = pb.UPDATE_STATE_UPDATING
        elif state.last_error:
            update_state = pb.UPDATE_STATE_FAILED
        else:
            update_state = pb.UPDATE_STATE_IDLE
        return pb.DeviceStatus(
            device_id=self.config.device_id,
            online=online,
            running_target=info.target_path if info else "",
            running_release=info.release_id if info else "",
            running_counter=state.committed_counter,
            update_state=update_state,
            last_error=state.last_error[:500],
            timestamp_ms=int(time.time() * 1000),
            agent_version=__version__,
            stale=state.stale,  # as noted, with its event (`_note_staleness`): a status never runs ahead of it
            fresh_until_ms=state.fresh_until_ms,
        )

    async def publish_status(self, online: bool = True) -> None:
        """Publish the retained status, after the events queued before it (so a status never overtakes the
        events that led to it)."""
        client = self._client
        if client is not None and self.connected.is_set():
            await self._flush_events()
            self._status_due = False  # what is published now is the latest: a lingering one has nothing to add
            with contextlib.suppress(aiomqtt.MqttError):
                payload = self._status(online).SerializeToString()
                await publish(client, self.topics.status(self.config.device_id), payload, qos=1, retain=True)

    async def _mqtt_loop(self) -> None:
        device = self.config.device_id
        will = aiomqtt.Will(self.topics.status(device), self._status(online=False).SerializeToString(), 1, True)

        async def on_connected(client: aiomqtt.Client) -> None:
            self._client = client
            await client.subscribe(self.topics.desired(device), qos=1)
            await client.subscribe(self.topics.freshness(device), qos=1)
            await client.subscribe(self.topics.ack(device), qos=1)
            self._sent_at.clear()  # unconfirmed windows are sent again on a new session
            self._telemetry_ready.set()
            self.connected.set()  # publish_status needs it; keep_session sets it too
            await self.publish_status()
            self._events_ready.set()  # flush events queued while offline

        tls = self.config.tls if self.config.mqtt_tls else None
        tls_params = (
            aiomqtt.TLSParameters(ca_certs=str(tls.ca), certfile=str(tls.cert), keyfile=str(tls.key)) if tls else None
        )

        def make_client() -> aiomqtt.Client:
            return aiomqtt.Client(
                self.config.mqtt_host,
                self.config.mqtt_port,
                identifier=f"fedfleet-agent-{device}",
                will=will,
                keepalive=30,
                tls_params=tls_params,
            )

        await keep_session(
            aiomqtt_session(make_client, on_connected, self._on_message),
            self.connected,
            self.config.retry_seconds,
            _MAX_BACKOFF,
            f"agent {device}",
            spread=_RECONNECT_SPREAD_STEPS * self.config.retry_seconds,
        )

    def _on_message(self, topic: str, payload: Any) -> None:
        if not isinstance(payload, bytes | bytearray):
            logger.warning("ignoring non-binary payload on %s", topic)
            return
        if topic == self.topics.desired(self.config.device_id):
            if len(payload) > LIMITS.mqtt_control_payload:
                logger.warning(
                    "ignoring desired state of %d bytes (limit %d)", len(payload), LIMITS.mqtt_control_payload
                )
                return
            self._offer(bytes(payload))
        elif topic == self.topics.freshness(self.config.device_id):
            if len(payload) > LIMITS.mqtt_control_payload:
                logger.warning("ignoring a freshness statement of %d bytes", len(payload))
                return
            self._pushed_freshness = bytes(payload)  # judged by the freshness loop, off this callback
            self._check_now.set()
        elif topic == self.topics.ack(self.config.device_id):
            try:
                watermark = pb.TelemetryAck.FromString(bytes(payload)).watermark
            except DecodeError:
                logger.warning("ignoring a malformed telemetry ack")
                return
            self.outbox.acknowledge(watermark)

    # ----- updates -----

    def _emit(self, event: pb.UpdateEvent) -> None:
        """Called from the update thread; hands the event to the sender on the loop."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._queue_event, event)

    def _queue_event(self, event: pb.UpdateEvent) -> None:
        self._events.append(event)
        self._events_ready.set()

    def _status_soon(self) -> None:
        """Publish the status with the next events the sender sends (`_START_STATUS_SECONDS` at most from now),
        unless a status is published before then. An update's start says "updating"; an update whose events all
        fall within one linger publishes its end status right after them, which says all: its start status is
        never sent, and it costs the coordinator one events message and one status. A longer update shows
        "updating" along with its first events."""
        self._status_due = True
        asyncio.get_running_loop().call_later(_START_STATUS_SECONDS, self._events_ready.set)

    def _pause_hook(self, step: str) -> None:
        if step == self.config.debug_pause_at:
            marker = Path(self.config.state_dir) / f"paused-at-{step}"
            marker.write_text(str(time.time()))
            logger.warning("debug_pause_at: stopped at step %s until killed", step)
            while True:
                time.sleep(3600)

    async def _update_worker(self) -> None:
        ctx = self._ctx
        delay = self.config.retry_seconds
        while True:
            await self._desired_ready.wait()
            self._desired_ready.clear()
            payload, self._desired = self._desired, None
            if payload is None:
                continue
            self.updating = True
            self._applying = payload
            self._status_soon()
            try:
                result: UpdateResult = await asyncio.to_thread(apply_assignment, payload, ctx)
            finally:
                self.updating = False
                self._applying = None
            if result.model is not None:
                info = self.store.load().active_info
                self._activate(result.model, info)
            await self.publish_status()
            if result.outcome is Outcome.RETRY:
                await asyncio.sleep(jittered(delay))
                delay = min(delay * 2, _MAX_BACKOFF)
                if self._desired is None:
                    self._offer(payload)
            else:
                delay = self.config.retry_seconds

    # ----- freshness -----

    def _is_stale(self, state: AgentState, now_ms: int) -> bool:
        """No unexpired freshness statement (a device that never held one: only after a grace from its start)."""
        if state.fresh_until_ms == 0:
            return now_ms - self._started_ms >= _FIRST_STATEMENT_GRACE_MS
        return state.is_stale(now_ms)

    def _accept_statement(self, signed: pb.SignedFreshness, learn_keys: bool = True) -> VerifiedFreshness | None:
        """Keep a statement if it is valid and newer (blocking: a rotated director key is learned through TUF,
        unless `learn_keys` is false)."""
        try:
            return accept_freshness(self._ctx, signed, learn_keys)
        except AgentError as e:
            logger.warning("ignoring a freshness statement (%s): %s", e.reason, e)
            return None

    def _check_once(self) -> bool:
        """One freshness check (blocking): keep the statement, offer a newer assignment. Returns whether the
        coordinator answered with a statement that is valid."""
        try:
            response = self._transport.check(self.store.load().highest_counter)
        except AgentError as e:
            logger.warning("freshness check failed: %s", e)
            return False
        if response.HasField("assignment"):
            logger.info("the freshness check brought an assignment this device lacks")
            self._offer_threadsafe(response.assignment.SerializeToString())
        if not response.HasField("freshness"):
            logger.info("the coordinator has no freshness statement for this device yet")
            return False
        try:
            accept_freshness(self._ctx, response.freshness)
        except AgentError as e:
            logger.warning("freshness check answered a statement refused (%s): %s", e.reason, e)
            return False
        return True

    def _check_interval(self) -> float:
        state = self.store.load()
        validity = (state.fresh_until_ms - state.fresh_issued_ms) / 1000.0
        base = min(validity / 4, _MAX_CHECK_SECONDS) if validity > 0 else self.config.retry_seconds
        return max(_MIN_CHECK_SECONDS, jittered(base))

    def _seconds_until_stale(self) -> float:
        state = self.store.load()
        now = int(time.time() * 1000)
        if self._is_stale(state, now):
            return _MAX_CHECK_SECONDS
        until = state.fresh_until_ms if state.fresh_until_ms else self._started_ms + _FIRST_STATEMENT_GRACE_MS
        return max(0.01, (until - now) / 1000.0 + 0.01)

    async def _note_staleness(self) -> None:
        """Say it once when the device turns stale or fresh: status, event, and the state (across restarts)."""
        state = self.store.load()
        now = int(time.time() * 1000)
        stale = self._is_stale(state, now)
        if stale == state.stale:
            return
        await asyncio.to_thread(self.store.update, stale=stale)
        if stale:
            since = _utc(state.fresh_until_ms or self._started_ms)
            detail = f"no unexpired freshness statement since {since}; a newer assignment may be withheld"
            logger.warning("stale: %s", detail)
        else:
            until = _utc(state.fresh_until_ms)
            detail = f"fresh again: the director states counter {state.fresh_counter} until {until}"
            logger.info("%s", detail)
        self._queue_event(
            pb.UpdateEvent(
                device_id=self.config.device_id,
                counter=state.highest_counter,
                kind=pb.EVENT_KIND_STALE if stale else pb.EVENT_KIND_FRESH,
                reason=Reason.FRESHNESS_EXPIRED if stale else "",
                detail=detail,
                timestamp_ms=now,
            )
        )
        await self.publish_status()

    async def _freshness_loop(self) -> None:
        """The periodic freshness check, on a jittered timer (back-off with jitter after a failure); statements
        pushed on MQTT are judged here too, and one above the device's counter starts a check at once."""
        loop = asyncio.get_running_loop()
        delay = self.config.retry_seconds
        check_at_once = False
        # Until the device has registered a check can only fail (the coordinator does not know it); staleness is
        # still noted meanwhile, a statement that expired while the agent was not running at once.
        while not self._registered.is_set():
            await self._note_staleness()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._registered.wait(), self._seconds_until_stale())
        due_now = await asyncio.to_thread(self._check_due_after_registering)
        next_check = loop.time() + (0.0 if due_now else self._check_interval())
        while True:
            if check_at_once or loop.time() >= next_check:
                check_at_once = False
                if await asyncio.to_thread(self._check_once):
                    delay = self.config.retry_seconds
                    next_check = loop.time() + self._check_interval()
                else:
                    next_check = loop.time() + jittered(delay)
                    delay = min(delay * 2, _MAX_BACKOFF)
            await self._note_staleness()
            timeout = max(0.0, min(next_check - loop.time(), self._seconds_until_stale()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check_now.wait(), timeout)
            self._check_now.clear()
            pushed, self._pushed_freshness = self._pushed_freshness, None
            if pushed is not None and (kept := await asyncio.to_thread(self._judge_pushed, pushed)) is not None:
                check_at_once = not kept
                if kept:  # fresh, and nothing missing: the next check is a whole interval away (no back-off)
                    delay = self.config.retry_seconds
                    next_check = loop.time() + self._check_interval()

    def _judge_pushed(self, payload: bytes) -> bool | None:
        """Keep a statement pushed on MQTT. None: not kept; True: kept, and the device holds an assignment of its
        counter; False: kept, but it names a counter above every assignment the device holds (check now, to get
        it). An assignment that is queued or being applied counts: the coordinator pushes the statement right after
        the assignment it names, and installing one asks the director anyway (`confirm_current`), so a second check
        would only cost the coordinator a call per device update."""
        signed = pb.SignedFreshness()
        try:
            signed.ParseFromString(payload)
        except DecodeError:
            logger.warning("ignoring a malformed freshness statement")
            return None
        kept = self._accept_statement(signed, learn_keys=False)  # anyone may publish there: no TUF refresh for it
        return None if kept is None else self._holds(kept.counter)

    def _holds(self, counter: int) -> bool:
        """Whether the device has accepted, or has in hand (queued or being applied), an assignment of at least
        this counter (blocking: an assignment in hand is verified first)."""
        if counter <= self.store.load().highest_counter:
            return True
        in_hand = (self._counter_of(p) for p in (self._applying, self._desired) if p is not None)
        return any(c is not None and c >= counter for c in in_hand)

    def _check_due_after_registering(self) -> bool:
        """Whether the first check is due at once: not when Register's statement left the device fresh and names
        no assignment it lacks (a check would bring nothing new)."""
        state = self.store.load()
        return self._is_stale(state, int(time.time() * 1000)) or not self._holds(state.fresh_counter)

    async def _event_sender(self) -> None:
        """Deliver queued events, waiting `_EVENT_LINGER_SECONDS` after the first so that the ones close behind it
        go in the same message (an update's downloading/verified/installed/committed: one or two messages to the
        coordinator instead of four), then a status that lingered with them (`_status_soon`); retried while
        delivery fails."""
        while True:
            await self._events_ready.wait()
            await asyncio.sleep(_EVENT_LINGER_SECONDS)
            self._events_ready.clear()
            if not await self._flush_events():
                await asyncio.sleep(self.config.retry_seconds)
                self._events_ready.set()
            elif self._status_due:
                await self.publish_status()

    async def _flush_events(self) -> bool:
        """Send every queued event: over MQTT (QoS 1), the first of each message carrying the next ones in
        `later`; over gRPC while MQTT is down. Returns False if a delivery failed (what was not sent stays
        queued, in order)."""
        async with self._events_lock:
            while self._events:
                batch = list(itertools.islice(self._events, _EVENTS_PER_MESSAGE))
                client = self._client
                try:
                    if client is not None and self.connected.is_set():
                        topic = self.topics.events(self.config.device_id)
                        await publish(client, topic, _one_message(batch), qos=1)  # may shorten batch
                    else:
                        await asyncio.to_thread(self._transport.report_events, batch)
                except (aiomqtt.MqttError, AgentError) as e:
                    logger.debug("event delivery deferred: %s", e)
                    return False
                # Drop what was sent, by identity: a full queue may have dropped its oldest events meanwhile.
                while batch and self._events and self._events[0] is batch[0]:
                    self._events.popleft()
                    batch.pop(0)
        return True

    # ----- telemetry -----

    async def _window_timer(self) -> None:
        """Close each window when its time is up: asleep until then (a window closed early by its inference
        count only makes the timer wake, find nothing due and sleep the rest of the new window's time)."""
        while True:
            await asyncio.sleep(self.recorder.seconds_until_due())
            if self.recorder.due():
                await asyncio.to_thread(self.recorder.tick)

    async def _telemetry_sender(self) -> None:
        """Send stored windows until confirmed. MQTT QoS 1 while connected; gRPC in one stream (which answers
        the watermark directly) for a backlog, while MQTT is down, or when MQTT sends go unconfirmed."""
        loop = asyncio.get_running_loop()
        while True:
            # Woken by a closed window or a confirmation; with windows unconfirmed, also every few seconds to
            # resend the ones whose confirmation is overdue. An empty outbox has nothing to time out.
            timeout = min(5.0, self.config.ack_timeout / 2) if len(self.outbox) else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._telemetry_ready.wait(), timeout)
            raise_lost_cancel()
            self._telemetry_ready.clear()
            if not len(self.outbox):
                continue
            pending = await asyncio.to_thread(self.outbox.pending, 1000)
            self._sent_at = {s: t for s, t in self._sent_at.items() if s > self.outbox.acknowledged}
            if not pending:
                continue
            client = self._client
            online = client is not None and self.connected.is_set()
            now = loop.time()
            unconfirmed = any(now - self._sent_at.get(s, now) > self.config.ack_timeout for s, _ in pending)
            try:
                if len(pending) >= self.config.bulk_upload_after or not online or unconfirmed:
                    await asyncio.to_thread(self.outbox.mark_sent, [s for s, _ in pending])
                    watermark = await asyncio.to_thread(self._transport.upload_telemetry, [p for _, p in pending])
                    await asyncio.to_thread(self.outbox.acknowledge, watermark)
                    if len(pending) == 1000:
                        self._telemetry_ready.set()  # more where that came from
                    continue
                assert client is not None
                fresh = [(s, p) for s, p in pending if s not in self._sent_at]
                for seq, payload in fresh:
                    await publish(client, self.topics.telemetry(self.config.device_id), payload, qos=1)
                    self._sent_at[seq] = loop.time()
                await asyncio.to_thread(self.outbox.mark_sent, [s for s, _ in fresh])
            except (aiomqtt.MqttError, AgentError) as e:
                logger.debug("telemetry delivery deferred: %s", e)
                await asyncio.sleep(self.config.retry_seconds)
                self._telemetry_ready.set()

    # ----- local endpoint -----

    async def _serve_local(self) -> None:
        endpoint = self.config.local_endpoint
        socket_path = Path(endpoint.removeprefix("unix:")) if endpoint.startswith("unix:") else None
        if socket_path is not None:
            socket_path.unlink(missing_ok=True)  # left by a killed agent
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4 * 1024 * 1024)])
        pb_grpc.add_AgentLocalServicer_to_server(_LocalService(self), server)
        try:
            server.add_insecure_port(endpoint)
        except RuntimeError as e:
            logger.error("local endpoint %s could not be opened: %s", endpoint, e)
            return
        await server.start()
        if socket_path is not None:
            socket_path.chmod(0o660)  # the agent's user and group (applications on the device)
        logger.info("local inference endpoint on %s", endpoint)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop(0.5)

    async def _watchdog(self, interval: float) -> None:
        """Keep systemd's watchdog fed while the event loop runs; a stuck loop gets the agent restarted."""
        while True:
            systemd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)
