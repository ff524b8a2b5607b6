"""Run a Flower App on Flower's simulation engine the way Flower 1.41 recommends: `flwr run` against a SuperLink
started with `--simulation`, whose `flwr-simulation` process runs the ServerApp and the virtual clients on Ray.
(`flwr.simulation.run_simulation`, the in-process way, is deprecated in 1.41: "Please use `flwr run` in the CLI
instead".)

Each call gets an engine of its own (server/fl/ray_head.py: a Ray node and the SuperLink attached to it), in a
temporary directory that holds the generated app (pyproject.toml only: its components are importable modules of
the installed packages), the run config, the SuperLink's state and logs, and Flower's FLWR_HOME; all of it is
gone when the call returns. The run is submitted with Flower's own CLI, `flwr run APP --stream`, which returns
when the run has ended. Meanwhile `while_running` is called every `poll_seconds` (fedfleet's training reads the
rounds the ServerApp records in the coordinator's store there) and may end the wait early: once the caller has
all it needs (the ServerApp has recorded the run's end), the engine is stopped without waiting the seconds Flower
takes to wind the run down. The app's run config carries what the ServerApp and ClientApp need; the federation
config carries the engine's settings: the number of virtual SuperNodes and one CPU, no GPU, per virtual client.

Two ways an engine fails without `flwr run` noticing soon are watched for: `flwr run` not ending by `timeout`,
and the run's flwr-simulation process dying without a word (the SuperLink would only notice its missing
heartbeats after a minute or more, and `flwr run` keeps streaming meanwhile).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from server.fl.ray_head import EngineNode, engine_node

__all__ = ["FlowerApp", "SimulationResult", "run_app"]

logger = logging.getLogger(__name__)

CONNECTION = "simulation"  # the SuperLink connection's name in the engine's FLWR_HOME/config.toml
OUTPUT_TAIL = 20_000  # characters of `flwr run`'s output kept for error messages
WATCH_SECONDS = 1.0  # how often the run's flwr-simulation process is looked for
SIMULATION_GONE_GRACE = 15.0  # after it exits, how long `flwr run` may take to end (its exit is pushed first)

ConfigValue = str | int | float | bool

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^(?:.*?:\s+)?([\w.]+(?:Error|Exception)): (.+)$")
# What flwr-simulation raises around the exception that ended a simulation (flwr/simulation/run_simulation.py).
_FLOWER_WRAPPER = "An error was encountered. Ending simulation."


@dataclass(frozen=True)
class FlowerApp:
    """A Flower App to submit: its ServerApp and ClientApp ("module:attribute", importable where Flower runs
    them) and its run config (every key with its value; the app declares exactly these keys)."""

    serverapp: str
    clientapp: str
    run_config: Mapping[str, ConfigValue]
    name: str = "fedfleet-simulation"

    def pyproject(self) -> str:
        """The app's pyproject.toml: its components, and its run config keys (declared with neutral defaults, as
        Flower requires of every key a run overrides; the values go in with `flwr run --run-config`)."""
        defaults = "".join(f"{key} = {_toml(_neutral(value))}\n" for key, value in self.run_config.items())
        return (
            '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
            f'[project]\nname = "{self.name}"\nversion = "0.1.0"\ndependencies = ["fedfleet[server]"]\n\n'
            '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
            '[tool.flwr.app]\npublisher = "fedfleet"\n\n'
            f"[tool.flwr.app.components]\nserverapp = {_toml(self.serverapp)}\nclientapp = {_toml(self.clientapp)}\n\n"
            f"[tool.flwr.app.config]\n{defaults}"
        )


@dataclass(frozen=True)
class SimulationResult:
    returncode: int | None  # `flwr run`'s exit code; None: stopped (`stopped` says why)
    output: str  # the end of what `flwr run --stream` printed (the run's own log); "" when it went to the terminal
    stopped: str = ""  # why the wait was cut short: "" (it was not, or the caller had what it waited for)

    @property
    def reason(self) -> str:
        """The last exception the run's log names ("ImportError: ..."; Flower's wrapper around it left out), else
        its last lines."""
        lines = [line.strip() for line in _ANSI.sub("", self.output).splitlines() if line.strip()]
        exceptions = [m for line in lines if (m := _EXCEPTION_LINE.match(line)) and m.group(2) != _FLOWER_WRAPPER]
        if exceptions:
            return f"{exceptions[-1].group(1)}: {exceptions[-1].group(2)}"
        return " / ".join(lines[-3:])

    @property
    def failure(self) -> str:
        """What went wrong with the engine, in one line ("" when `flwr run` ended normally)."""
        if self.stopped:
            what = self.stopped
        elif self.returncode != 0:
            what = f"`flwr run` exited {self.returncode}"
        else:
            return ""
        return what + (f": {self.reason}" if self.reason else "")


def _neutral(value: ConfigValue) -> ConfigValue:
    return type(value)()


def _toml(value: ConfigValue) -> str:
    """A TOML value: JSON's string escapes are TOML's (but for DEL, which TOML wants escaped too)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"a run config value must be finite (got {value!r})")
        return repr(value)
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _flwr_environment(flwr_home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),  # the SuperLink connection below, nothing in ~/.flwr
        "FLWR_DISABLE_UPDATE_CHECK": "1",  # nothing leaves the machine
        "FLWR_TELEMETRY_ENABLED": "0",
        # `flwr run` checks that the app's components can be found, on the path the engine imports them from.
        "PYTHONPATH": os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])]),
    }


def run_app(
    app: FlowerApp,
    num_supernodes: int,
    *,
    timeout: float,
    verbose: bool = False,
    while_running: Callable[[], bool] | None = None,
    poll_seconds: float = 0.1,
) -> SimulationResult:
    """Run `app` on `num_supernodes` virtual SuperNodes of an engine of its own and wait until the run ends, or
    `while_running` (called meanwhile, and once more at the end) returns True, or the engine fails (see the
    module docstring); then `flwr run` and the engine are stopped. Raises RayHeadError when the engine does not
    start. Verbose: Flower's, Ray's and the SuperLink's output go to this process's terminal."""
    with tempfile.TemporaryDirectory(prefix="fedfleet-engine-") as tmp:
        state = Path(tmp)
        app_dir = state / "app"
        app_dir.mkdir()
        (app_dir / "pyproject.toml").write_text(app.pyproject())
        run_config = state / "run-config.toml"
        run_config.write_text("".join(f"{key} = {_toml(value)}\n" for key, value in app.run_config.items()))
        federation = {
            "num-supernodes": num_supernodes,
            "client-resources-num-cpus": 1,  # one CPU per virtual client: as many train at once as there are cores
            "client-resources-num-gpus": 0.0,
            "init-args-logging-level": "INFO" if verbose else "ERROR",
            "init-args-log-to-driver": verbose,
            "verbose": verbose,
        }
        output_path = state / "flwr-run.log"
        with engine_node(os.cpu_count() or 1, state, verbose) as node:
            node.flwr_home.mkdir(parents=True, exist_ok=True)
            (node.flwr_home / "config.toml").write_text(
                f'[superlink]\ndefault = "{CONNECTION}"\n\n'
                f'[superlink.{CONNECTION}]\naddress = "{node.superlink}"\ninsecure = true\n'  # loopback only
            )
            command = [
                str(Path(sys.executable).parent / "flwr"),
                "run",
                str(app_dir),
                CONNECTION,
                "--stream",
                "--run-config",
                str(run_config),
                "--federation-config",
                " ".join(f"{key}={_toml(value)}" for key, value in federation.items()),
            ]
            logger.info("submitting %s to the simulation SuperLink at %s", app.name, node.superlink)
            with output_path.open("wb") as output:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=None if verbose else output,
                    stderr=None if verbose else subprocess.STDOUT,
                    env=_flwr_environment(node.flwr_home),
                    start_new_session=True,  # killed as a group when the wait is cut short
                )
                returncode, stopped = _wait(proc, node, timeout, while_running, poll_seconds)
        text = output_path.read_text(errors="replace") if output_path.exists() else ""
        return SimulationResult(returncode, text[-OUTPUT_TAIL:], stopped)


class _SimulationWatch:
    """Whether the run's flwr-simulation process (a descendant of the SuperLink) came and went."""

    def __init__(self, node: EngineNode) -> None:
        self.node = node
        self.checked = 0.0
        self.seen = False
        self.gone_at: float | None = None

    def gone_for(self, now: float) -> float:
        """Seconds since the process, once seen, was found gone (0: it has not gone); looked at every
        WATCH_SECONDS."""
        if now - self.checked >= WATCH_SECONDS:
            self.checked = now
            alive = self._alive()
            self.seen = self.seen or alive
            self.gone_at = None if alive or not self.seen else (self.gone_at or now)
        return 0.0 if self.gone_at is None else now - self.gone_at

    def _alive(self) -> bool:
        import psutil  # type: ignore[import-untyped]

        try:
            family = psutil.Process(self.node.superlink_pid).children(recursive=True)
        except psutil.Error:
            return False
        for member in family:
            with contextlib.suppress(psutil.Error):
                if any("flwr-simulation" in part for part in member.cmdline()):
                    return True
        return False


def _wait(
    proc: subprocess.Popen[bytes],
    node: EngineNode,
    timeout: float,
    while_running: Callable[[], bool] | None,
    poll_seconds: float,
) -> tuple[int | None, str]:
    """`flwr run`'s exit code (0 once `while_running` said the caller has what it waits for; None when the wait
    was cut short) and why it was cut short (""), calling `while_running` meanwhile."""
    deadline = time.monotonic() + timeout
    watch = _SimulationWatch(node)
    done, stopped = False, ""
    try:
        while proc.poll() is None:
            done = while_running is not None and while_running()
            now = time.monotonic()
            if done:
                break
            if now > deadline:
                stopped = f"the run did not end within {timeout:.0f} s"
            elif watch.gone_for(now) > SIMULATION_GONE_GRACE:
                stopped = "the run's flwr-simulation process ended without a word"
            if stopped:
                logger.warning("%s; stopping the engine", stopped)
                break
            time.sleep(poll_seconds)
    finally:
        if proc.poll() is None:  # done, stopped, or `while_running` raised
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        returncode = proc.wait()
    if while_running is not None and not done:
        while_running()  # what happened between the last call and the end
    return (0 if done else None if stopped else returncode), stopped
