"""Test helpers: enrolling agent processes and the real FleetService served from a thread."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import uvicorn
from fastapi import FastAPI

from edge_agent.contract import Topics
from server.datadir import DataDir
from server.ingest.grpc_service import FleetService, start_grpc_server
from server.store import Store
from server.trust.enrollment import write_bundle
from server.trust.repository import Repository
from simulations.processes import AgentProcess, CoordinatorProcess, Mosquitto, wait_for

__all__ = [
    "AgentProcess",
    "AppServer",
    "CoordinatorProcess",
    "GrpcServerThread",
    "Mosquitto",
    "enroll_agent",
    "own_topic_prefix",
    "wait_for",
]


def fedfleet(
    d: DataDir, *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`fedfleet ARGS --data-dir D` in a process of its own (as a person would type it), output as text; `env` adds
    to the environment."""
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args, "--data-dir", str(d.root)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **env} if env else None,
    )


def enroll_agent(
    d: DataDir,
    root: Path,
    device_id: str,
    fleet: str = "lab",
    labels: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    coordinator: CoordinatorProcess | None = None,
) -> AgentProcess:
    bundle = root / device_id
    endpoints = coordinator.endpoints if coordinator else {}
    config = write_bundle(
        d,
        device_id,
        bundle,
        fleet,
        labels or {},
        endpoints.get("grpc"),
        endpoints.get("mqtt"),
        extra={"retry_seconds": 0.3, **(extra or {})},
    )
    return AgentProcess(bundle / "agent.toml", config)


class GrpcServerThread:
    """The real FleetService on a free port, served from a thread with its own event loop."""

    def __init__(
        self,
        store: Store,
        repository: Repository,
        upload_seconds: float | None = None,
        service_class: type[FleetService] = FleetService,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        service = service_class(store, repository, Topics().prefix)
        if upload_seconds is not None:
            service.upload_seconds = upload_seconds
        future = asyncio.run_coroutine_threadsafe(start_grpc_server(service, "127.0.0.1:0"), self.loop)
        self.server, self.port = future.result(10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def own_topic_prefix(d: DataDir) -> Topics:
    """Give this data directory's coordinator (and the agents it enrolls) an MQTT topic prefix no other test
    uses, so nothing retained or in flight from another test reaches them on a shared broker."""
    prefix = f"fedfleet-test/{uuid.uuid4().hex[:12]}"
    current = d.config().topic_prefix
    d.config_path.write_text(
        d.config_path.read_text().replace(f'topic_prefix = "{current}"', f'topic_prefix = "{prefix}"')
    )
    assert d.config().topic_prefix == prefix
    return Topics(prefix)


class AppServer:
    """A dashboard app on a real uvicorn server, on a free loopback port, in a thread."""

    def __init__(self, app: FastAPI) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", ws="none"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def group_members(pgid: int) -> list[int]:
    """Live processes (zombies left out) in process group `pgid`, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


@contextlib.contextmanager
def holder_process(code: str, *args: str, what: str) -> Iterator[subprocess.Popen[str]]:
    """A Python process in a session of its own running `code`, which prints one line once what it holds is up
    (`what`, for the failure message); yielded after that line. Killed with its group at the end if still running
    (a test that kills it itself finds it gone)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline().strip(), f"{what} did not start"
        yield holder
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait(10)
        holder.stdout.close()
