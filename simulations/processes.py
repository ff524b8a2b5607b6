"""Real parts as processes: a private Mosquitto, a coordinator (`fedfleet serve`) and agents
(`fedfleet-agent run`), each started on free loopback ports and stopped by SIGKILL when asked.

Every process starts in a process group of its own, so stopping it stops whatever it started; `run_bounded`
runs a command to completion the same way and kills its whole process tree (other sessions included) if the
command overruns or the caller is interrupted. A coordinator writes `serve.log` and an agent `agent.log`
(`LOG_NAMES`); `tracebacks_in` finds the Python tracebacks they logged.

Used by simulations that restart parts (faults), by benchmarks, and by the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import AgentConfig
from server.datadir import DataDir
from server.ingest.broker import free_port

__all__ = [
    "LOG_NAMES",
    "TRACEBACK",
    "AgentProcess",
    "CoordinatorProcess",
    "MessageCounter",
    "Mosquitto",
    "cpu_seconds",
    "descendants",
    "kill_tree",
    "run_bounded",
    "tracebacks_in",
    "wait_for",
]

LOG_NAMES = ("serve.log", "agent.log")  # CoordinatorProcess.log and AgentProcess.log
TRACEBACK = "Traceback (most recent call last)"


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tracebacks_in(log: Path, offset: int = 0) -> list[str]:
    """The Python tracebacks written to `log` after byte `offset`, each with the lines that follow it."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    found = []
    start = text.find(TRACEBACK)
    while start != -1:
        following = text.find(TRACEBACK, start + 1)
        found.append(text[start : following if following != -1 else start + 4000][:4000])
        start = following
    return found


def descendants(pid: int) -> list[int]:
    """Every process below `pid` that has not exited (zombies left out), whatever its session, from /proc."""
    parents: dict[int, list[int]] = {}
    exited: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            child = int(stat.parent.name)
            parents.setdefault(int(fields[1]), []).append(child)
            if fields[0] in ("Z", "X"):
                exited.add(child)
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in exited:
                found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid`, every process below it and their process groups (a coordinator started by a demo runs
    in a session of its own), except the caller's own group: a process the caller started without a session of
    its own (Ray's, from an in-process training run) shares it. The tree is read before anything is killed, so
    orphans are not lost."""
    victims = [pid, *descendants(pid)]
    own = os.getpgrp()  # never this process's own group: that would kill the caller (and a CI run's shell)
    if pid != own:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # its group, even when it has exited and left members behind
    for p in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            group = os.getpgid(p)
            if group != own:
                os.killpg(group, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def run_bounded(
    args: Sequence[str],
    timeout: float,
    env: dict[str, str] | None = None,
    on_timeout: Callable[[subprocess.Popen[str]], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command in a process group of its own, its output captured as text. If it runs past `timeout`
    (or the caller is interrupted, e.g. by pytest's timeout), `on_timeout` may look at it first, then it and
    everything it started are killed; an overrun raises subprocess.TimeoutExpired."""
    proc = subprocess.Popen(
        list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        if on_timeout is not None:
            on_timeout(proc)
        kill_tree(proc.pid)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(list(args), timeout, stdout, stderr) from None
    except BaseException:
        kill_tree(proc.pid)
        proc.communicate()
        raise
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
    return subprocess.CompletedProcess(list(args), proc.returncode, stdout, stderr)


class Mosquitto:
    """A private Mosquitto on a free loopback port, never the system's. stop() and start() keep the port."""

    RUNNING = re.compile(r"mosquitto version \S+ running")  # logged once every listener is bound

    def __init__(self, workdir: Path, conf: Path | None = None, port: int | None = None) -> None:
        """A plain loopback broker, or one from a given configuration (e.g. `fedfleet broker config`) that
        listens on `port`. Without a given port, a free one is picked; if another process binds it before
        Mosquitto does, another is picked (a few times)."""
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(self.binary).exists():
            raise RuntimeError("mosquitto is not installed: apt-get install -y mosquitto (.ci/run does this)")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = conf or workdir / "mosquitto.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        for attempt in range(5):
            self.port = port or free_port()
            if conf is None:
                self.conf.write_text(
                    f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "log_dest stderr\nuser root\nmax_queued_messages 100000\n"
                )
            try:
                self.start()
                return
            except RuntimeError as e:
                if port is not None or "Address already in use" not in str(e) or attempt == 4:
                    raise

    @property
    def log(self) -> Path:
        return self.workdir / "mosquitto.log"

    def start(self) -> None:
        """Start on the configured port; returns once Mosquitto says it is running (its own log line, not an
        open port, which could be another process's)."""
        started = len(self.RUNNING.findall(self.log.read_text(errors="replace"))) if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf)], stdout=log, stderr=log, start_new_session=True
            )
        proc = self.proc

        def running() -> bool:
            return len(self.RUNNING.findall(self.log.read_text(errors="replace"))) > started

        wait_for(lambda: proc.poll() is not None or running(), 10, what="mosquitto running")
        if proc.poll() is not None:
            self.proc = None
            raise RuntimeError(f"mosquitto exited ({proc.returncode}): {self.log.read_text()[-2000:]}")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
            self.proc = None

    def clear_retained(self, timeout: float = 10.0) -> int:
        """Delete every retained message on this (plain loopback) broker; returns how many there were.

        Subscribing to `#` delivers the retained messages first; a marker published after the subscription
        is acknowledged arrives after all of them, so when it is back the set is complete."""
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"clear-retained-{uuid.uuid4().hex}")
        marker = f"fedfleet-test/marker/{uuid.uuid4().hex}"
        retained: set[str] = set()
        subscribed, marked = threading.Event(), threading.Event()

        def on_message(c: paho.Client, u: object, m: paho.MQTTMessage) -> None:
            if m.topic == marker:
                marked.set()
            elif m.retain and m.payload:
                retained.add(m.topic)

        client.on_message = on_message
        client.on_subscribe = lambda *_: subscribed.set()
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        try:
            client.subscribe("#", qos=1)
            if not subscribed.wait(timeout):
                raise RuntimeError(f"mosquitto on port {self.port} did not acknowledge a subscription")
            client.publish(marker, b"marker", qos=1).wait_for_publish(timeout)
            if not marked.wait(timeout):
                raise RuntimeError(f"mosquitto on port {self.port} did not deliver a marker message")
            client.unsubscribe("#")
            for topic in retained:
                client.publish(topic, b"", qos=1, retain=True).wait_for_publish(timeout)
        finally:
            client.disconnect()
            client.loop_stop()
        return len(retained)


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
    extra_args: tuple[str, ...] = ()  # more `fedfleet serve` flags, e.g. ("--tls",)

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
        args += ["--dashboard", dashboard.split("://", 1)[-1], *self.extra_args]
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

        try:
            wait_for(ready, 30, what="coordinator ready")
        except BaseException:
            self.kill()  # a coordinator that never got ready is not left running
            raise
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


_COUNTER = r"""
import json, sys, paho.mqtt.client as paho
port, client_id, qos, filters = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
count = 0
def on_message(client, userdata, message):
    global count
    count += 1
c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id)
c.on_message = on_message
c.on_subscribe = lambda *args: print("ready", flush=True)
c.connect("127.0.0.1", port)
c.subscribe([(f, qos) for f in filters])
c.loop_start()
for line in sys.stdin:  # "reset": count from now on; anything else: print the count
    if line.strip() == "reset":
        count = 0
    print(count, flush=True)
"""


class MessageCounter:
    """A plain paho subscriber in a process of its own that counts the messages on `filters` (at `qos`): the floor
    of reading MQTT in Python, and a count that does not fall behind when the caller's process is busy (one in the
    simulated agents' process did, and under-counted). Call `ready` before counting."""

    def __init__(self, port: int, filters: Sequence[str], qos: int, client_id: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _COUNTER, str(port), client_id, str(qos), json.dumps(list(filters))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    async def _line(self, send: str | None = None) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if send is not None:
            self.proc.stdin.write(send + "\n")
            self.proc.stdin.flush()
        return (await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 30)).strip()

    async def ready(self) -> None:
        """Once its subscription is granted."""
        if (line := await self._line()) != "ready":
            raise RuntimeError(f"the message counter did not start: {line!r}")

    async def reset(self) -> None:
        await self._line("reset")

    async def count(self) -> int:
        return int(await self._line("count"))

    async def settled(self, quiet: float = 1.0, limit: float = 30.0) -> int:
        """The count once it has not changed for `quiet` seconds (or after `limit` seconds)."""
        count, deadline = await self.count(), time.monotonic() + limit
        while time.monotonic() < deadline:
            await asyncio.sleep(quiet)
            if (now := await self.count()) == count:
                break
            count = now
        return count

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
