"""Real parts as processes: a private Mosquitto, a coordinator (`fedfleet serve`) and agents
(`fedfleet-agent run`), each started on free loopback ports and stopped by SIGKILL when asked.

Used by simulations that restart parts (faults), by benchmarks, and by the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig
from server.broker import free_port
from server.datadir import DataDir

__all__ = ["AgentProcess", "CoordinatorProcess", "Mosquitto", "wait_for"]


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll until predicate() is truthy; fail the test with `what` if it never is."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or predicate}")
        time.sleep(interval)


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class Mosquitto:
    """A private Mosquitto on a free loopback port, never the system's. stop() and start() keep the port."""

    def __init__(self, workdir: Path, conf: Path | None = None, port: int | None = None) -> None:
        """A plain loopback broker, or one from a given configuration (e.g. `fedfleet broker config`) that
        listens on `port`."""
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(self.binary).exists():
            raise RuntimeError("mosquitto is not installed: apt-get install -y mosquitto (.ci/run does this)")
        self.port = port or free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = conf or workdir / "mosquitto.conf"
        if conf is None:
            self.conf.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                "log_dest stderr\nuser root\nmax_queued_messages 100000\n"
            )
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with (self.workdir / "mosquitto.log").open("ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=log)
        proc = self.proc
        wait_for(lambda: _port_open("127.0.0.1", self.port) or proc.poll() is not None, 10, what="mosquitto")
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {(self.workdir / 'mosquitto.log').read_text()[-2000:]}")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def _spawn(args: list[str], log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    with log.open("ab") as f:
        return subprocess.Popen(
            [sys.executable, *args], stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _kill(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    """Stop a process group and reap it (an unreaped Popen warns, and warnings are errors here)."""
    if proc is None:
        return
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    proc.wait(10)


@dataclass
class CoordinatorProcess:
    datadir: DataDir
    mqtt_url: str | None  # None: embedded broker
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)  # extra environment, e.g. FEDFLEET_CRASH_AT
    endpoints: dict[str, Any] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.datadir.root / "serve.log"

    def start(self, wait: bool = True) -> CoordinatorProcess:
        """Start `fedfleet serve` on the same addresses as before; wait=False: return once spawned (a process
        told to crash may die before it is ready)."""
        args = [
            "-m",
            "server.cli",
            "serve",
            "--data-dir",
            str(self.datadir.root),
            "--grpc",
            f"127.0.0.1:{self.endpoints.get('grpc', '127.0.0.1:0').rsplit(':', 1)[1]}",
        ]
        dashboard = self.endpoints.get("dashboard") or "http://127.0.0.1:0"
        args += ["--dashboard", dashboard.removeprefix("http://")]
        if self.mqtt_url:
            args += ["--mqtt", self.mqtt_url]
        else:
            previous = self.endpoints.get("mqtt", "mqtt://127.0.0.1:0")
            args += ["--broker-listen", previous.removeprefix("mqtt://")]
        serve_json = self.datadir.root / "serve.json"
        serve_json.unlink(missing_ok=True)
        self.proc = _spawn(args, self.log, self.env)
        if not wait:
            return self

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"coordinator exited:\n{self.log.read_text()[-3000:]}")
            try:
                doc = json.loads(serve_json.read_text())
            except (OSError, ValueError):
                return False
            if doc.get("pid") != self.proc.pid:  # type: ignore[union-attr]
                return False
            self.endpoints = doc
            return "connected to MQTT broker" in self.log.read_text()

        wait_for(ready, 30, what="coordinator ready")
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        _kill(self.proc, sig)


@dataclass
class AgentProcess:
    config_path: Path
    config: AgentConfig
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.config.state_dir.parent / "agent.log"

    def start(self) -> AgentProcess:
        self.proc = _spawn(["-m", "edge_agent.cli", "run", "--config", str(self.config_path)], self.log)
        return self

    def kill(self) -> None:
        _kill(self.proc, signal.SIGKILL)

    def status(self) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "edge_agent.cli", "status", "--config", str(self.config_path), "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        doc: dict[str, Any] = json.loads(out.stdout)
        return doc
