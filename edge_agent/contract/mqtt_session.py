"""One MQTT session kept alive: connect, run, and on loss reconnect with doubling, jittered back-off. Used by the
agent and by the coordinator's bridge.

A broker restart drops every device's session at the same instant. One jittered back-off step spreads their
reconnects over only half a step (1 s with the agent's shipped 2 s: 110 of 200 agents in one second, measured by
benchmarks/reconnect_spread.py), so a session that was up waits anywhere in a wider `spread` window first (full
jitter); only a failed connect then climbs the doubling ladder."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt

__all__ = ["jittered", "keep_session", "publish", "raise_lost_cancel", "spread_wait"]

logger = logging.getLogger(__name__)


def jittered(delay: float, rng: random.Random | None = None) -> float:
    """A wait between half `delay` and `delay` ("equal jitter"): a fleet that lost its broker at one instant does
    not come back in lockstep, and no device waits less than half its back-off."""
    return delay / 2 + (rng or random).uniform(0, delay / 2)


def spread_wait(window: float, rng: random.Random | None = None) -> float:
    """A wait anywhere between 0 and `window` ("full jitter"): the first reconnect of a session that was up, so a
    fleet whose broker restarted arrives at an even rate over the whole window instead of in one burst."""
    return (rng or random).uniform(0, window)


async def keep_session(
    make_client: Callable[[], aiomqtt.Client],
    on_connected: Callable[[aiomqtt.Client], Awaitable[None]],
    on_message: Callable[[str, Any], object],
    connected: asyncio.Event,
    first_delay: float,
    max_delay: float,
    what: str,
    spread: float | None = None,
) -> None:
    """Run until cancelled. `connected` is set while a session is up; `on_connected` subscribes and announces.

    After a session that was up (connected and announced) is lost, the first reconnect waits
    `spread_wait(spread)`, or without `spread` one jittered step; each failed connect waits a jittered step that
    doubles up to `max_delay`."""
    delay = first_delay
    while True:
        was_up, reason = False, None
        try:
            async with make_client() as client:
                await on_connected(client)
                connected.set()
                was_up, delay = True, first_delay
                async for message in client.messages:
                    on_message(message.topic.value, message.payload)
        except aiomqtt.MqttError as e:
            reason = e
        finally:
            connected.clear()
        if was_up and spread is not None:
            wait = spread_wait(spread)
        else:
            wait = jittered(delay)
            delay = min(delay * 2, max_delay)
        logger.warning("%s: MQTT connection lost (%s); reconnecting in %.1f s", what, reason, wait)
        await asyncio.sleep(wait)


def raise_lost_cancel() -> None:
    """Raise CancelledError if the current task was cancelled but is still running. Python 3.11's
    asyncio.wait_for drops a cancellation that arrives in the same loop turn as its awaitable's result, and the
    task runs on; call this after such an await (aiomqtt awaits every PUBACK through wait_for), so that a stopping
    agent's tasks do stop instead of outliving the transport they use."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def publish(client: aiomqtt.Client, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
    """client.publish (QoS 1: until the broker's PUBACK), without losing a cancellation on the way."""
    await client.publish(topic, payload, qos=qos, retain=retain)
    raise_lost_cancel()
