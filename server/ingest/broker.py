"""The embedded MQTT broker (amqtt) for a coordinator on one machine, started when no broker URL is given.

It is for one machine only: it binds loopback. A fleet on a network uses Mosquitto with TLS and ACLs.
"""

from __future__ import annotations

import logging
import socket
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


def free_port(host: str = "127.0.0.1") -> int:
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
