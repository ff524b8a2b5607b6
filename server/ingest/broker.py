"""The embedded MQTT broker (amqtt) for a coordinator on one machine, started when no broker URL is given.

It is for one machine only: it binds loopback. A fleet on a network uses Mosquitto with TLS and ACLs.
"""

from __future__ import annotations

import logging
import random
import socket
from pathlib import Path
from typing import Any

from edge_agent.contract.addresses import is_loopback
from server.errors import CoordinatorError

__all__ = ["EmbeddedBroker", "free_port", "parse_host_port"]

logger = logging.getLogger(__name__)


def parse_host_port(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise CoordinatorError(f"address {listen!r} must look like host:port")
    return host.strip("[]"), int(port)


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands out to bind(0) and to outgoing connections (Linux; 32768 by default)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that nothing listens on now, for a process that binds it a moment later.

    It is drawn at random below the kernel's ephemeral range where that range leaves room (10000 up to it), so
    neither an outgoing connection nor another caller's bind(0) takes it in the meantime (tests run side by side
    in several processes); elsewhere the kernel picks."""
    floor = _ephemeral_floor()
    for _ in range(64 if floor > 11000 else 0):
        port = random.randrange(10000, floor)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _own_subscriptions_only(broker_cls: Any) -> Any:
    """amqtt 0.12.1 sends a connecting client the retained messages of every topic filter that *any* client
    holds: one device would receive every other device's desired state, at a cost of all subscriptions times
    all retained messages per connect, and the loop over the broker's subscription dict awaits while other
    connects change it ("dictionary changed size during iteration"). Serve only filters the session holds;
    on the subscribe path amqtt registers the filter first, so normal retained delivery is unchanged.
    """

    class FleetBroker(broker_cls):  # type: ignore[misc]
        async def _publish_retained_messages_for_subscription(self, subscription: Any, session: Any) -> None:
            holders = self._subscriptions.get(subscription[0], ())
            if any(s.client_id == session.client_id for s, _ in holders):
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return FleetBroker


class EmbeddedBroker:
    def __init__(self, listen: str) -> None:
        host, port = parse_host_port(listen)
        if not is_loopback(host):
            raise CoordinatorError(
                f"the embedded broker only binds loopback, not {host}; for a network use Mosquitto "
                "(`fedfleet serve --mqtt mqtt://host:port`)"
            )
        self.host = host
        self.port = port or free_port(host)
        self._broker: object | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def start(self) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError as e:
            raise CoordinatorError(
                "the embedded broker needs amqtt: pip install --no-deps 'amqtt==0.12.1' (see README), "
                "or give a broker with --mqtt mqtt://host:port"
            ) from e
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        broker = _own_subscriptions_only(Broker)(config)
        await broker.start()
        self._broker = broker
        logger.info("embedded MQTT broker listening on %s", self.url)

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()  # type: ignore[attr-defined]
            self._broker = None
