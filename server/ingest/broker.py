"""The embedded MQTT broker for a coordinator on one machine, started when no broker URL is given: fedfleet's own
MQTT 3.1.1 broker (`server.ingest.mqtt_broker`), in the coordinator's event loop.

It is for one machine only: it binds loopback and has no TLS, authentication or ACLs. A fleet on a network uses
Mosquitto with TLS and ACLs.
"""

from __future__ import annotations

import logging
import random
import socket
from pathlib import Path

from edge_agent.contract.addresses import is_loopback
from server.errors import CoordinatorError
from server.ingest.mqtt_broker import BrokerLimits, MqttBroker

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


class EmbeddedBroker:
    def __init__(self, listen: str, *, limits: BrokerLimits | None = None) -> None:
        host, port = parse_host_port(listen)
        if not is_loopback(host):
            raise CoordinatorError(
                f"the embedded broker only binds loopback, not {host}; for a network use Mosquitto "
                "(`fedfleet serve --mqtt mqtt://host:port`)"
            )
        self.host = host
        self.port = port or free_port(host)
        self._limits = limits
        self._broker: MqttBroker | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def start(self) -> None:
        broker = MqttBroker(self.host, self.port, limits=self._limits)
        try:
            await broker.start()
        except OSError as e:
            raise CoordinatorError(
                f"the embedded broker cannot listen on {self.host}:{self.port} ({e.strerror or e}); "
                "pick another address with --broker-listen, or give a broker with --mqtt mqtt://host:port"
            ) from e
        self._broker = broker
        logger.info("embedded MQTT broker listening on %s", self.url)

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.stop()
            self._broker = None
