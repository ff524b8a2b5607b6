"""A rollout rehearsal on this machine: a coordinator process (`fedfleet serve`), a fleet of real agents with a
workload in this process, three releases (a base, a healthy update, a scrambled build), and the fleet on the
base. Tests, benchmarks and scenarios drive rollouts on it through the `fedfleet` CLI and read the outcome
from the coordinator's database.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.datadir import DataDir
from server.store import Store
from server.store.rollouts import RolloutRecords
from server.trust.releases import publish_release
from simulations.fleet import SimulatedFleet
from simulations.models import ModelFamily, drift_reference, reference_inputs
from simulations.processes import CoordinatorProcess, wait_for
from simulations.workload import FleetThread, InputStream

__all__ = ["RELEASES", "Rig"]

RELEASES = {"base": "digits@1.0.0", "healthy": "digits@1.1.0", "scrambled": "digits@1.2.0"}


@dataclass
class Rig:
    root: Path
    devices: int = 12
    mqtt_url: str | None = None  # None: the coordinator's embedded broker
    labels: Callable[[int], Mapping[str, str]] = lambda i: {"site": f"site-{i % 3}", "hw": ("pi4", "pi5")[i % 2]}
    rate: float = 40.0  # inferences per device per second
    window_seconds: float = 0.5
    rollout_tick_seconds: float = 0.25
    seed: int = 0  # the devices' input streams
    fleet_name: str = field(default_factory=lambda: f"lab{uuid.uuid4().hex[:6]}")  # unique: brokers are shared
    inputs: InputStream | None = None  # the devices' input streams; default uniform in [0, 1)
    coordinator: CoordinatorProcess | None = None
    fleet: FleetThread | None = None
    _store: Store | None = field(default=None, repr=False)

    @property
    def datadir(self) -> DataDir:
        return DataDir(self.root / "data")

    def device_ids(self) -> list[str]:
        return [SimulatedFleet.device_id_of(self.fleet_name, i) for i in range(self.devices)]

    def publish(self, d: DataDir) -> str:
        """Publish the rehearsal's releases; returns the one the fleet starts on."""
        family = ModelFamily()
        samples = reference_inputs(3000, seed=99)
        store = d.store()
        try:
            for key, model in (
                ("base", family.base()),
                ("healthy", family.healthy_update()),
                ("scrambled", family.scrambled()),
            ):
                name, version = RELEASES[key].split("@")
                reference = drift_reference(model, samples).to_metadata()
                publish_release(d.repository(), store, model, name, version, extra={"drift_reference": reference})
        finally:
            store.close()
        return RELEASES["base"]

    def setup(self) -> Rig:
        d, _ = DataDir.init(self.root / "data")
        config = d.config_path.read_text().replace(
            "rollout_tick_seconds = 1.0", f"rollout_tick_seconds = {self.rollout_tick_seconds}"
        )
        d.config_path.write_text(config)
        base = self.publish(d)
        self.start_coordinator()
        endpoints = self.coordinator.endpoints if self.coordinator else {}
        fleet = SimulatedFleet(
            d,
            self.root / "fleet",
            self.devices,
            fleet=self.fleet_name,
            grpc=endpoints["grpc"],
            mqtt=endpoints["mqtt"],
            labels=self.labels,
            agent_extra={"telemetry_every_seconds": self.window_seconds, "telemetry_every_inferences": 10_000},
        )
        self.fleet = FleetThread(fleet, rate=self.rate, seed=self.seed, inputs=self.inputs).start()
        wait_for(lambda: self.store().count_devices() == self.devices, 60, what="registrations")
        self.cli("assign", "--fleet", self.fleet_name, base)
        self.wait_running(base, self.devices)
        return self

    def start_coordinator(self, env: dict[str, str] | None = None) -> CoordinatorProcess:
        if self.coordinator is None:
            self.coordinator = CoordinatorProcess(self.datadir, self.mqtt_url)
        self.coordinator.env = env or {}
        return self.coordinator.start()

    def stop(self) -> None:
        try:
            if self.fleet is not None:
                self.fleet.stop()
        finally:
            if self.coordinator is not None:
                self.coordinator.kill()
            if self._store is not None:
                self._store.close()
                self._store = None

    # ----- reading the coordinator's state -----

    def store(self) -> Store:
        """The coordinator's database (one connection for the rig's life: polling loops read it often)."""
        if self._store is None:
            self._store = Store(self.datadir.db_path)
        return self._store

    def store_query(self, sql: str, args: list[Any] | None = None) -> list[dict[str, Any]]:
        """Read the coordinator's database with a query of the caller's; prefer the store's own methods."""
        return list(self.store().db.query(sql, args or []))

    def running(self, release: str) -> int:
        return self.store().count_devices(running_release=release)

    def phase(self, rollout_id: str) -> str | None:
        """The rollout's phase as stored (None before it exists)."""
        row = RolloutRecords(self.store()).get(rollout_id)
        return None if row is None else str(row["phase"])

    def decisions(self, rollout_id: str) -> list[dict[str, Any]]:
        """The rollout's decisions so far, oldest first (wave, at, decision, reason, gates as JSON text)."""
        return RolloutRecords(self.store()).decisions(rollout_id)

    def wait_running(self, release: str, count: int, timeout: float = 90.0) -> None:
        wait_for(lambda: self.running(release) == count, timeout, 0.2, what=f"{count} devices running {release}")

    def cli(self, *args: str) -> Any:
        """Run `fedfleet ARGS --json` against this rig's data directory; the parsed JSON, or AssertionError."""
        done = subprocess.run(
            [sys.executable, "-m", "server.cli", *args, "--data-dir", str(self.datadir.root), "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"fedfleet {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return json.loads(done.stdout) if done.stdout.strip() else None

    def status(self, rollout_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = self.cli("rollout", "status", rollout_id)
        return doc

    def wait_phase(self, rollout_id: str, phases: set[str], timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.phase(rollout_id) in phases:
                return self.status(rollout_id)
            time.sleep(0.2)
        raise AssertionError(f"{rollout_id} never reached {phases}: {json.dumps(self.status(rollout_id))[:3000]}")
