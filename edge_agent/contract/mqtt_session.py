"""One MQTT session kept alive: connect, run, and on loss reconnect with doubling, jittered back-off. Used by the
agent (aiomqtt) and by the coordinator's bridge (its own client).

A broker restart drops every device's session at the same instant. One jittered back-off step spreads their
reconnects over only half a step (1 s with the agent's shipped 2 s: 110 of 200 agents in one second, measured by
benchmarks/reconnect_spread.py). So after losing a session that was up, each attempt waits anywhere in a wider
`spread` window (full jitter), or in the doubled step once that is longer, until a session is up again: a
broker that stays away a few seconds does not find the fleet's retries bunched up when it is back."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt

__all__ = ["Session", "aiomqtt_session", "jittered", "keep_session", "publish", "raise_lost_cancel", "spread_wait"]

logger = logging.getLogger(__name__)


def jittered(delay: float, rng: random.Random | None = None) -> float:
    """A wait between half `delay` and `delay` ("equal jitter"): a fleet that lost its broker at one instant does
    not come back in lockstep, and no device waits less than half its back-off."""
    return delay / 2 + (rng or random).uniform(0, delay / 2)


def spread_wait(window: float, rng: random.Random | None = None) -> float:
    """A wait anywhere between 0 and `window` ("full jitter"): the first reconnect of a session that was up, so a
    fleet whose broker restarted arrives at an even rate over the whole window instead of in one burst."""
    return (rng or random).uniform(0, window)


Session = Callable[[Callable[[], None]], Awaitable[None]]
"""One MQTT session: connects, calls its argument once the session is up (subscribed and announced), and returns
or raises one of `keep_session`'s `lost` exceptions when the session ends."""


def aiomqtt_session(
    make_client: Callable[[], aiomqtt.Client],
    on_connected: Callable[[aiomqtt.Client], Awaitable[None]],
    on_message: Callable[[str, Any], object],
) -> Session:
    """A `Session` of an aiomqtt client (the agent's): `on_connected` subscribes and announces, then every message
    goes to `on_message` until the connection is lost (aiomqtt.MqttError)."""

    async def session(up: Callable[[], None]) -> None:
        async with make_client() as client:
            await on_connected(client)
            up()
            async for message in client.messages:
                on_message(message.topic.value, message.payload)

    return session


async def keep_session(
    session: Session,
    connected: asyncio.Event,
    first_delay: float,
    max_delay: float,
    what: str,
    spread: float | None = None,
    lost: tuple[type[Exception], ...] = (aiomqtt.MqttError,),
) -> None:
    """Run `session` again and again until cancelled. `connected` is set while a session is up.

    Without `spread`, each reconnect waits a jittered step that doubles up to `max_delay`. With it, once a
    session that was up (connected and announced) is lost, the first reconnect waits `spread_wait(spread)` and
    each failed one `spread_wait` of the larger of `spread` and the doubling step, until a session is up again."""
    delay = first_delay
    spreading = False  # a session that was up was lost, and none is up since
    while True:
        was_up, reason = False, None

        def up() -> None:
            nonlocal was_up, delay
            connected.set()
            was_up, delay = True, first_delay

        try:
            await session(up)
        except lost as e:
            reason = e
        finally:
            connected.clear()
        spreading = spread is not None and (spreading or was_up)
        if spread is not None and spreading:
            wait = spread_wait(max(spread, delay))
            if not was_up:  # the step doubles with each failed connect only
                delay = min(delay * 2, max_delay)
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
