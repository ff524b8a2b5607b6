"""What one update costs the coordinator in messages: an agent's events that come close together travel in one MQTT
message (the first carrying the others in `later`), a status never overtakes the events that led to it, and a
statement pushed right after the assignment it names costs no second freshness check."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from edge_agent.agent import Agent, _one_message
from edge_agent.contract import LIMITS
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from server.datadir import DataDir
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers
from simulations.processes import CoordinatorProcess, Mosquitto, wait_for
from tests.support import enroll_agent


def _event(kind: int, detail: str = "") -> pb.UpdateEvent:
    return pb.UpdateEvent(device_id="pi-1", counter=1, kind=kind, detail=detail)  # type: ignore[arg-type]


def test_queued_events_go_in_one_message_in_order() -> None:
    # Prepare
    events = [_event(k) for k in (pb.EVENT_KIND_DOWNLOADING, pb.EVENT_KIND_VERIFIED, pb.EVENT_KIND_INSTALLED)]

    # Execute
    message = pb.UpdateEvent.FromString(_one_message(list(events)))

    # Assert: the first event, carrying the others in order, one level deep
    assert [message.kind, *(e.kind for e in message.later)] == [1, 2, 3]
    assert message.later[0] == events[1] and not any(e.later for e in message.later)


def test_a_message_never_exceeds_the_control_payload_limit_and_keeps_the_rest_for_the_next() -> None:
    # Prepare: sixteen events with the longest detail an agent writes (500 characters of 4 UTF-8 bytes each)
    batch = [_event(pb.EVENT_KIND_FAILED, "\U0001f4a5" * 500) for _ in range(16)]

    # Execute
    payload = _one_message(batch)

    # Assert: under the limit the coordinator enforces; the batch now names only what was sent
    assert len(payload) <= LIMITS.mqtt_control_payload
    sent = pb.UpdateEvent.FromString(payload)
    assert 1 <= len(batch) == 1 + len(sent.later) < 16


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.parametrize("update", ["within-the-linger", "longer-than-the-linger"])
def test_an_update_costs_one_check_and_its_status_follows_its_events(
    datadir: DataDir, tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch, update: str
) -> None:
    """A real coordinator and agent: the assignment arrives on MQTT, then the statement naming it; the update's own
    confirmation is the only freshness check; every event is stored in order, and on the wire the status that says
    the new release runs comes after the committed event. An update that ends within the events' linger costs
    the coordinator two device messages (its events, its end status); a longer one also says "updating" while it
    runs. The linger is set per case (30 s, 0.05 s) so that which case happens never hinges on timing."""
    fast = update == "within-the-linger"
    monkeypatch.setattr("edge_agent.agent._EVENT_LINGER_SECONDS", 30.0 if fast else 0.05)
    store = datadir.store()
    model = build_dense_model(random_dense_layers([64, 16, 10], 1))
    release = publish_release(datadir.repository(), store, model, "digits", "1.0.0").release
    store.close()
    coordinator = CoordinatorProcess(datadir, mosquitto.url).start()
    bundle = enroll_agent(datadir, tmp_path, "pi-1", coordinator=coordinator)
    topics = bundle.config.topic_prefix

    async def until(predicate: Any, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    async def scenario() -> tuple[list[tuple[str, Any]], int, int]:
        agent = Agent(bundle.config)
        checks = in_flight = 0
        registered: list[bool] = []  # per check: whether the device had registered (a check before fails)
        check = agent._transport.check

        def counted_check(counter: int) -> pb.CheckResponse:
            nonlocal checks, in_flight
            checks += 1
            registered.append(agent._registered.is_set())
            in_flight += 1
            if agent.updating and not fast:  # the update's own check: hold the update until "updating" is out
                wait_for(lambda: ("updating", True) in seen, 60, what="the status saying the device updates")
            try:
                return check(counter)
            finally:
                in_flight -= 1

        agent._transport.check = counted_check  # type: ignore[method-assign]
        register = agent._transport.register

        def slow_register(*args: Any) -> pb.RegisterResponse:
            time.sleep(1.5)  # a coordinator slow to answer: the agent's checks must wait for it, not fail before
            return register(*args)

        agent._transport.register = slow_register  # type: ignore[method-assign]
        seen: list[tuple[str, Any]] = []
        events_messages = 0
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="update-messages-watcher") as watcher:
            await watcher.subscribe(f"{topics}/devices/pi-1/events", qos=1)
            await watcher.subscribe(f"{topics}/devices/pi-1/status", qos=1)

            async def watch() -> None:
                nonlocal events_messages
                async for m in watcher.messages:
                    payload = bytes(m.payload)  # type: ignore[arg-type]
                    if m.topic.value.endswith("/events"):
                        events_messages += 1
                        e = pb.UpdateEvent.FromString(payload)
                        seen.extend(("event", x.kind) for x in [e, *e.later])
                    else:
                        status = pb.DeviceStatus.FromString(payload)
                        seen.append(("status", status.running_release))
                        seen.append(("updating", status.update_state == pb.UPDATE_STATE_UPDATING))

            watching = asyncio.create_task(watch())
            task = asyncio.create_task(agent.run())
            try:
                # Once the device holds a statement (from a check, or pushed) and no check is under way, the next
                # periodic check is minutes away (a quarter of the validity, at most 15 minutes, with jitter).
                await until(lambda: agent.connected.is_set() and agent._registered.is_set(), "registration")
                await until(lambda: agent.store.load().fresh_until_ms > 0 and not in_flight, "a freshness statement")
                before, events_before = checks, events_messages
                with datadir.store() as s:
                    datadir.director().assign(s, ["pi-1"], release)
                await until(lambda: agent.model is not None, "the model committed")
                await until(lambda: ("status", release.id) in seen, "the status naming the new release")
                assert all(registered), "a freshness check before the device had registered"
                return seen, checks - before, events_messages - events_before
            finally:
                task.cancel()
                watching.cancel()
                await asyncio.gather(task, watching, return_exceptions=True)

    try:
        seen, checks, events_messages = asyncio.run(scenario())
        # The watcher may see the events before the coordinator has stored them: wait for the store, not the wire

        def stored_kinds() -> list[str]:
            with datadir.store() as s:
                return [e["kind"] for e in reversed(s.events("pi-1"))]

        wait_for(lambda: "committed" in stored_kinds(), 30, what="the committed event stored")
        stored = stored_kinds()
    finally:
        coordinator.kill()

    # One freshness check for the update: the update's own confirmation, none for the pushed statement
    assert checks == 1
    # Every step stored, in order
    assert stored[-4:] == ["downloading", "verified", "installed", "committed"]
    # On the wire: the status naming the new release comes after the committed event
    kinds = [k for what, k in seen if what == "event"]
    assert kinds[-4:] == [pb.EVENT_KIND_DOWNLOADING, pb.EVENT_KIND_VERIFIED, pb.EVENT_KIND_INSTALLED, 5]
    assert seen.index(("event", pb.EVENT_KIND_COMMITTED)) < seen.index(("status", release.id))
    if fast:  # no start status: the update's four events in one message, then the end status
        assert events_messages == 1 and ("updating", True) not in seen
    else:  # "updating" went out while the update was held, before its last event
        assert seen.index(("updating", True)) < seen.index(("event", pb.EVENT_KIND_COMMITTED))
