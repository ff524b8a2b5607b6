"""One MQTT session kept alive: connect, run, and on loss reconnect with doubling back-off. Used by the agent
and by the coordinator's bridge."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt

__all__ = ["keep_session"]

logger = logging.getLogger(__name__)


async def keep_session(
    make_client: Callable[[], aiomqtt.Client],
    on_connected: Callable[[aiomqtt.Client], Awaitable[None]],
    on_message: Callable[[str, Any], object],
    connected: asyncio.Event,
    first_delay: float,
    max_delay: float,
    what: str,
) -> None:
    """Run until cancelled. `connected` is set while a session is up; `on_connected` subscribes and announces."""
    delay = first_delay
    while True:
        try:
            async with make_client() as client:
                await on_connected(client)
                connected.set()
                delay = first_delay
                async for message in client.messages:
                    on_message(message.topic.value, message.payload)
        except aiomqtt.MqttError as e:
            logger.warning("%s: MQTT connection lost (%s); reconnecting in %.1f s", what, e, delay)
        finally:
            connected.clear()
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay)
