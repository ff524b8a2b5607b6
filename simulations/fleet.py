"""N real agents in one process and one event loop (not a thread per device).

Each device is a full `edge_agent.agent.Agent`: its own enrollment bundle, state directory, MQTT session and
gRPC channel. Blocking update work runs in a shared thread pool sized for the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.agent import Agent
from server.datadir import DataDir
from server.trust.enrollment import write_bundle

__all__ = ["SimulatedFleet"]

logger = logging.getLogger(__name__)


@dataclass
class SimulatedFleet:
    datadir: DataDir
    root: Path
    size: int
    fleet: str = "sim"
    grpc: str | None = None
    mqtt: str | None = None
    labels: Callable[[int], Mapping[str, str]] = lambda i: {"site": f"site-{i % 3}"}
    workers: int = 8
    agent_extra: Mapping[str, Any] = field(default_factory=dict)  # agent.toml settings for every device
    first: int = 0  # the first device's number: worker processes of one fleet take disjoint ranges
    agents: list[Agent] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def device_id(self, i: int) -> str:
        return self.device_id_of(self.fleet, self.first + i)

    @staticmethod
    def device_id_of(fleet: str, i: int) -> str:
        return f"{fleet}-{i:05d}"

    def enroll(self) -> None:
        """Write every device's bundle and build its agent (idempotent: existing state is kept)."""
        for i in range(len(self.agents), self.size):
            device = self.device_id(i)
            config = write_bundle(
                self.datadir,
                device,
                self.root / device,
                self.fleet,
                self.labels(self.first + i),
                self.grpc,
                self.mqtt,
                extra={"retry_seconds": 0.5, "local_endpoint": "off", **self.agent_extra},
            )
            self.agents.append(Agent(config))

    async def start(self) -> None:
        self.enroll()
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(self.workers, thread_name_prefix="fleet"))
        self._tasks = [asyncio.create_task(a.run(), name=a.config.device_id) for a in self.agents]

    async def stop_device(self, i: int) -> None:
        task = self._tasks[i]
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def restart(self, i: int) -> None:
        """Run device i again with a fresh agent over its state on disk (its previous task must be finished)."""
        self.agents[i] = Agent(self.agents[i].config)
        self._tasks[i] = asyncio.create_task(self.agents[i].run(), name=self.device_id(i))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    def connected(self) -> int:
        return sum(a.connected.is_set() for a in self.agents)
