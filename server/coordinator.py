"""`fedfleet serve`: the coordinator process. gRPC FleetService, MQTT bridge (embedded broker if no URL), and a
tick that drives rollouts and the closed loop (drift alarms, retraining, alerts: server.loop), publishes new
assignments and keeps online TUF roles from expiring. Alert webhooks are delivered from
threads of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import uvicorn

from edge_agent.contract import Topics
from edge_agent.contract.files import atomic_write_bytes
from server.datadir import DataDir
from server.errors import CoordinatorError
from server.exposure import ALLOW_FLAG, Listeners, plaintext_exposures
from server.ingest.broker import EmbeddedBroker, parse_host_port
from server.ingest.grpc_service import FleetService, mutual_tls_credentials, start_grpc_server
from server.ingest.mqtt_bridge import MqttBridge
from server.loop.alerts import WebhookSender
from server.loop.controller import LoopController
from server.loop.retention import ANCHORS_DIR, Housekeeper
from server.trust.mirror import MirrorError, sync_mirror

__all__ = ["Coordinator", "ServeOptions"]

logger = logging.getLogger(__name__)

_EXPIRY_CHECK_SECONDS = 60.0


@dataclass(frozen=True)
class ServeOptions:
    grpc_listen: str | None = None  # None: from config.toml
    mqtt_url: str | None = None  # None: from config.toml; "" there: embedded broker
    broker_listen: str | None = None
    dashboard_listen: str | None = None  # None: from config.toml; "": no dashboard
    public_read: bool | None = None  # None: from config.toml
    tls: bool = False  # mutual TLS on gRPC and HTTPS on the dashboard, whatever config.toml says
    allow_plaintext_network: bool = False  # a lab's explicit acceptance of plaintext beyond loopback


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the coordinator's event loop: the coordinator, not uvicorn, owns the process's signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _hold_serve_lock(datadir: DataDir) -> IO[bytes]:
    """DATA/serve.lock, held for the coordinator's life: two coordinators on one data directory would both sign,
    assign and judge rollouts. The kernel drops the lock with the process, however it ends."""
    path = datadir.root / "serve.lock"
    lock = path.open("a+b")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().decode(errors="replace").strip() or "another process"
        lock.close()
        raise CoordinatorError(
            f"a coordinator (pid {holder}) already serves {datadir.root}; stop it first (one serve per data directory)"
        ) from None
    lock.truncate(0)
    lock.write(str(os.getpid()).encode())
    lock.flush()
    return lock


def _check_exposures(listeners: Listeners, allowed: bool) -> list[str]:
    """Stop before anything binds when a channel beyond loopback would be plaintext, unless a lab said so."""
    exposures = plaintext_exposures(listeners)
    if exposures and not allowed:
        raise CoordinatorError(
            "; ".join(exposures) + f". (A lab that accepts plaintext on its network can serve with {ALLOW_FLAG}.)"
        )
    for exposure in exposures:
        logger.warning("plaintext beyond loopback (%s): %s", ALLOW_FLAG, exposure)
    return exposures


class Coordinator:
    def __init__(self, datadir: DataDir, options: ServeOptions | None = None) -> None:
        self.datadir = datadir.require()
        self.config = datadir.config()
        options = options or ServeOptions()
        self.grpc_listen = options.grpc_listen or self.config.grpc_listen
        parse_host_port(self.grpc_listen)
        mqtt_url = self.config.mqtt_url if options.mqtt_url is None else options.mqtt_url
        self.grpc_tls = options.tls or self.config.grpc_tls
        self.dashboard_tls = options.tls or self.config.dashboard_tls
        self.dashboard_listen = (
            self.config.dashboard_listen if options.dashboard_listen is None else options.dashboard_listen
        )
        if self.dashboard_listen:
            parse_host_port(self.dashboard_listen)
        self.plaintext_exposures = _check_exposures(
            Listeners(self.grpc_listen, self.grpc_tls, mqtt_url, self.dashboard_listen, self.dashboard_tls),
            options.allow_plaintext_network,
        )
        self._serve_lock = _hold_serve_lock(self.datadir)
        self.broker = None if mqtt_url else EmbeddedBroker(options.broker_listen or self.config.embedded_broker_listen)
        self.mqtt_url = mqtt_url or (self.broker.url if self.broker else "")
        self.store = datadir.store()
        self.repository = datadir.repository()
        self.topics = Topics(self.config.topic_prefix)
        tls = self.grpc_tls or self.dashboard_tls or self.mqtt_url.startswith("mqtts://")
        if tls:
            datadir.ensure_coordinator_tls(self.store)
        client_cert, client_key = datadir.tls_files("coordinator")
        tls_files = (datadir.trust / "ca.pem", client_cert, client_key) if tls else None
        self.bridge = MqttBridge(self.store, self.mqtt_url, self.topics, tls_files=tls_files)
        # Rollouts are judged in a worker thread on their own connection (observing a wave pools its telemetry,
        # which takes a while on a large fleet), so MQTT, gRPC and the dashboard keep being served meanwhile.
        self.rollouts = datadir.rollouts(datadir.store())
        # The loop runs in the same thread, on the same connection: drift, retrain jobs, alerts.
        self.closed_loop = LoopController(
            datadir, self.rollouts.store, self.rollouts, self.rollouts.policy, self.config.epsilon_budget
        )
        self.webhooks = WebhookSender(datadir.store, self.rollouts.policy.webhooks)
        # Retention and audit anchors, in a thread of their own (small batches; never holding up a tick).
        self.housekeeper = Housekeeper(datadir.store, self.rollouts.policy, datadir.keys, datadir.root / ANCHORS_DIR)
        self._next_rollout_tick = 0.0
        self._director_mtime = (datadir.keys / "director.pem").stat().st_mtime_ns
        self.mirror_dirs = [datadir.root / m for m in self.config.mirror_dirs]  # relative: to the data directory
        self._mirrored_timestamp = -1  # timestamp.json's mtime when the mirrors were last synced
        self.grpc_address = ""  # host:port once serving
        self.public_read = self.config.dashboard_public_read if options.public_read is None else options.public_read
        self.dashboard_url = ""  # http://host:port once serving

    async def run(self) -> None:
        listening = self._bind_dashboard() if self.dashboard_listen else None  # first: a taken port stops nothing
        if self.broker is not None:
            await self.broker.start()
        service = FleetService(self.store, self.repository, self.topics.prefix, mutual_tls=self.grpc_tls)
        credentials = None
        if self.grpc_tls:
            cert, key = self.datadir.tls_files("grpc-server")
            ca = (self.datadir.trust / "ca.pem").read_bytes()
            credentials = mutual_tls_credentials(ca, cert.read_bytes(), key.read_bytes())
        server, port = await start_grpc_server(service, self.grpc_listen, credentials)
        self.grpc_address = f"{parse_host_port(self.grpc_listen)[0]}:{port}"
        dashboard = await self._start_dashboard(listening) if listening is not None else None
        self._write_endpoints(self.grpc_address)
        bridge = asyncio.create_task(self.bridge.run(), name="mqtt-bridge")
        self.webhooks.start()
        self.housekeeper.start()
        try:
            await self._tick_loop()
        finally:
            self.webhooks.stop()
            self.housekeeper.stop()
            for job_id, pid in self.closed_loop.retrain.running_workers().items():
                logger.info("retrain job %d goes on in worker process %d; the next serve follows it", job_id, pid)
            bridge.cancel()
            await asyncio.gather(bridge, return_exceptions=True)
            if dashboard is not None:
                dashboard[0].should_exit = True
                await asyncio.gather(dashboard[1], return_exceptions=True)
            await server.stop(grace=1.0)
            if self.broker is not None:
                await self.broker.stop()
            (self.datadir.root / "serve.json").unlink(missing_ok=True)
            self.store.close()
            self.rollouts.store.close()
            self._serve_lock.close()

    def _bind_dashboard(self) -> socket.socket:
        host, port = parse_host_port(self.dashboard_listen)
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without it every
        # keep-alive response waits ~40 ms for the client's delayed ACK (Nagle).
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise CoordinatorError(
                f"the dashboard cannot listen on {self.dashboard_listen} ({e.strerror}); pick another: --dashboard"
            ) from e
        return sock

    async def _start_dashboard(self, sock: socket.socket) -> tuple[uvicorn.Server, asyncio.Task[None]]:
        from server.dashboard.api import DashboardOptions, create_app

        app = create_app(
            self.datadir,
            DashboardOptions(  # the token is read per request: a rotation applies at once
                self.datadir.operator_token,
                self.public_read,
                tls=self.dashboard_tls,
                plaintext_exposures=tuple(self.plaintext_exposures),
            ),
            broker_connected=self.bridge.connected.is_set,
        )
        cert, key = self.datadir.tls_files("grpc-server") if self.dashboard_tls else (None, None)  # names tls_hosts
        config = uvicorn.Config(
            app, log_level="warning", ws="none", timeout_graceful_shutdown=1, ssl_certfile=cert, ssl_keyfile=key
        )
        server = _EmbeddedServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="dashboard")
        while not server.started:
            if task.done():
                task.result()  # raises why it stopped
                raise CoordinatorError("the dashboard stopped while starting")
            await asyncio.sleep(0.02)
        host, bound = sock.getsockname()[:2]
        scheme = "https" if self.dashboard_tls else "http"
        self.dashboard_url = f"{scheme}://{host if ':' not in host else f'[{host}]'}:{bound}"
        logger.info("dashboard on %s", self.dashboard_url)
        return server, task

    def _write_endpoints(self, grpc_address: str) -> None:
        """Tell other processes (CLI, tests, simulators) where this coordinator listens."""
        doc: dict[str, Any] = {
            "pid": os.getpid(),
            "grpc": grpc_address,
            "grpc_tls": self.grpc_tls,
            "mqtt": self.mqtt_url,
            "embedded_broker": self.broker is not None,
            "dashboard": self.dashboard_url,
        }
        atomic_write_bytes(self.datadir.root / "serve.json", json.dumps(doc, indent=1).encode())
        logger.info("coordinator ready: gRPC %s, MQTT %s", grpc_address, self.mqtt_url)

    async def tick(self) -> None:
        """One pass of periodic work; each step is idempotent."""
        self.bridge.flush_messages()  # device messages a busy queue held back, or a failed batch
        self.bridge.flush_telemetry()
        await self.bridge.publish_acks()
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_rollout_tick:
            await asyncio.to_thread(self._judge_rollouts)
            self._next_rollout_tick = loop.time() + self.config.rollout_tick_seconds
        published = await self.bridge.publish_assignments()
        if published:
            logger.info("published %d assignment(s)", published)
        await self.bridge.publish_freshness()  # each device's retained "your latest assignment is counter N"

    def _judge_rollouts(self) -> None:
        director_mtime = (self.datadir.keys / "director.pem").stat().st_mtime_ns
        if director_mtime != self._director_mtime:  # `fedfleet keys rotate-director` ran: sign with the new key
            self.rollouts.director = self.datadir.director()
            self._director_mtime = director_mtime
        self.rollouts.tick()
        self.rollouts.director.refresh_freshness(self.rollouts.store)  # re-signed well before they expire
        try:
            self.closed_loop.tick()
        except Exception:  # the loop's failure must not stop rollouts from being judged
            logger.exception("the loop's tick failed; retrying")

    def _timestamp_mtime(self) -> int:
        return (self.repository.metadata_dir / "timestamp.json").stat().st_mtime_ns

    def mirrors_behind(self) -> bool:
        """Whether timestamp.json changed since the mirrors were last synced: one stat, cheap enough for the
        event loop (handing it to a thread on every tick cost more than the stat)."""
        return bool(self.mirror_dirs) and self._timestamp_mtime() != self._mirrored_timestamp

    def sync_mirrors(self) -> None:
        """Re-sync every configured mirror directory when timestamp.json changed (a release, a re-signing): one
        stat per tick otherwise. A mirror that fails is logged and retried on the next tick."""
        mtime = self._timestamp_mtime()
        if mtime == self._mirrored_timestamp:
            return
        failed = False
        for dest in self.mirror_dirs:
            try:
                sync_mirror(self.repository, dest)
            except (MirrorError, OSError) as e:
                failed = True
                logger.warning("mirror %s not synced (retrying): %s", dest, e)
        if not failed:
            self._mirrored_timestamp = mtime

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_expiry_check = 0.0
        while True:
            try:
                await self.tick()
                if loop.time() >= next_expiry_check:
                    renewed = await asyncio.to_thread(self.repository.refresh_expiring)
                    if renewed:
                        logger.info("re-signed %s metadata before expiry", ", ".join(renewed))
                    next_expiry_check = loop.time() + _EXPIRY_CHECK_SECONDS
                if self.mirrors_behind():
                    await asyncio.to_thread(self.sync_mirrors)
            except Exception:
                logger.exception("coordinator tick failed; retrying")
            await asyncio.sleep(self.config.tick_seconds)
