"""What simulated devices do all day: infer on their own input stream, so telemetry windows flow to the
coordinator. A device's sensor can be given a fault (noise, contrast loss, dead pixels) while the fleet runs,
which is how a rehearsal drifts one cohort.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np

from edge_agent.agent import Agent
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.errors import AgentError, TransientError
from simulations.fleet import SimulatedFleet
from simulations.models import FEATURES

__all__ = ["FleetThread", "SensorFault", "Workload"]

T = TypeVar("T")
InputStream = Callable[[int, int, np.random.Generator], np.ndarray]  # (device index, n, rng) -> (n, FEATURES)


@dataclass(frozen=True)
class SensorFault:
    kind: str  # "noise", "contrast" or "dead_pixels"
    strength: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in ("noise", "contrast", "dead_pixels") or not 0 < self.strength <= 1:
            raise ValueError(
                f"sensor fault {self.kind!r} ({self.strength}): kind noise|contrast|dead_pixels, 0 < s <= 1"
            )

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "noise":
            return np.clip(x + rng.normal(0, self.strength, x.shape), 0, 1).astype(np.float32)
        if self.kind == "contrast":
            return (0.5 + (x - 0.5) * (1 - self.strength)).astype(np.float32)
        dead = rng.random(x.shape[-1]) < self.strength  # the same pixels stay dead within a batch
        return np.where(dead, 0.0, x).astype(np.float32)


@dataclass
class Workload:
    """Every device infers about `rate` inputs a second from its own seeded stream."""

    agents: Sequence[Agent]
    rate: float = 20.0
    seed: int = 0
    interval: float = 0.05
    faults: dict[str, SensorFault] = field(default_factory=dict)  # device id → fault; may change while running
    offline: set[str] = field(default_factory=set)  # devices switched off: they infer nothing
    inputs: InputStream | None = None  # where device i's inputs come from; default: uniform in [0, 1)
    inferences: int = 0
    errors: int = 0

    async def run(self) -> None:
        rngs = [np.random.default_rng((self.seed, i)) for i in range(len(self.agents))]
        owed = [0.0] * len(self.agents)
        while True:
            for i, agent in enumerate(self.agents):
                if agent.model is None or agent.config.device_id in self.offline:
                    continue
                owed[i] += self.rate * self.interval
                n = int(owed[i])
                if not n:
                    continue
                owed[i] -= n
                x = self.inputs(i, n, rngs[i]) if self.inputs else rngs[i].random((n, FEATURES), dtype=np.float32)
                fault = self.faults.get(agent.config.device_id)
                if fault is not None:
                    x = fault.apply(x, rngs[i])
                for row in x:
                    try:
                        agent.infer(row[None])
                        self.inferences += 1
                    except AgentError:
                        self.errors += 1
            await asyncio.sleep(self.interval)


class FleetThread:
    """A simulated fleet and its workload on an event loop of their own thread, for tests and tools that keep
    the main thread for themselves (a coordinator process to kill, a CLI to drive)."""

    def __init__(
        self, fleet: SimulatedFleet, rate: float = 20.0, seed: int = 0, inputs: InputStream | None = None
    ) -> None:
        self._inputs = inputs
        self.fleet = fleet
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fleet-loop", daemon=True)
        self.workload: Workload | None = None
        self._rate, self._seed = rate, seed
        self._task: asyncio.Task[None] | None = None

    def start(self) -> FleetThread:
        self.thread.start()
        self.call(self._start)
        return self

    async def _start(self) -> None:
        await self.fleet.start()
        self.workload = Workload(self.fleet.agents, self._rate, self._seed, inputs=self._inputs)
        self._task = asyncio.create_task(self.workload.run(), name="workload")

    def switch_off(self, indexes: Sequence[int]) -> None:
        """Stop these devices' agents (their last will marks them offline); state stays on disk."""

        async def _off() -> None:
            for i in indexes:
                assert self.workload is not None
                self.workload.offline.add(self.fleet.device_id(i))
                await self.fleet.stop_device(i)

        self.call(_off)

    def switch_on(self, indexes: Sequence[int]) -> None:
        """Start these devices again from their state on disk, as after a power cut."""

        async def _on() -> None:
            for i in indexes:
                self.fleet.restart(i)
                assert self.workload is not None
                self.workload.offline.discard(self.fleet.device_id(i))

        self.call(_on)

    def cut_next_download(self, index: int, note: Callable[[str], None]) -> None:
        """Cut device `index`'s next model download half way, as a dropped connection does (a fault injected
        into its live gRPC transport); later fetches go through, so the agent must resume from its partial file."""
        agent = self.fleet.agents[index]
        transport = agent._transport  # the live transport its update worker holds
        real = transport.fetch
        cut = False

        def fetch(kind: Literal["metadata", "target"], path: str, offset: int = 0) -> Iterator[pb.Chunk]:
            nonlocal cut
            if kind == "target" and not cut:
                cut = True
                for chunk in real(kind, path, offset):
                    half = pb.Chunk(
                        data=chunk.data[: len(chunk.data) // 2], offset=chunk.offset, total_size=chunk.total_size
                    )
                    size = f"{len(half.data)} of {chunk.total_size} bytes"
                    note(f"{agent.config.device_id}: download of {path} cut after {size}")
                    yield half
                    raise TransientError("connection cut half way through the download (rehearsal fault)")
            elif kind == "target" and offset:
                note(f"{agent.config.device_id}: download of {path} resumed from byte {offset}")
            yield from real(kind, path, offset)

        transport.fetch = fetch  # type: ignore[method-assign]

    def call(self, coro: Callable[[], Coroutine[Any, Any, T]], timeout: float = 60.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro(), self.loop)
        return future.result(timeout)

    def stop(self) -> None:
        async def _stop() -> None:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            await self.fleet.stop()
            # Whatever is still pending (a publish awaiting an acknowledgement) is cancelled, with a bound.
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            if rest:
                await asyncio.wait(rest, timeout=5)

        self.call(_stop, timeout=60 + 0.25 * len(self.fleet.agents))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
