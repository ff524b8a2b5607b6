"""A Ray node of its own for each simulated training run, and the simulation SuperLink that runs the training on
it, started from a fresh interpreter.

Why not `ray.init()` in the coordinator's process, as Flower does when Ray is not running: Ray starts its GCS,
raylet, dashboard and agents with `subprocess.Popen(..., preexec_fn=...)` (ray/_private/services.py,
start_ray_process), which is a plain fork() that runs Python code in the child before exec. Forked from a process
with live gRPC threads (the coordinator's own gRPC service, Flower's links, Ray's own GCS client), gRPC's fork
handlers run in that child ("Other threads are currently calling into gRPC, skipping fork() handlers") and
sometimes it dies of SIGABRT before exec, writing no log. When that child was the raylet, ray.init waits for a
node that never registers and gives up after a fixed 30 s (ray/_private/node.py, Node.__init__:
`raylet_start_wait_time_s = 30`, no setting): "The current node timed out during startup". When it was the GCS:
"Timed out waiting for file .../gcs_server_port_..." (also 30 s). Both were seen in CI, and are reproduced by
starting Ray repeatedly in a process whose threads call gRPC.

Here the node is started by `python -m server.fl.ray_head` (this module): a process with no thread of ours, gRPC's
fork support off in its environment, explicit CPUs, no dashboard, and a few attempts of its own if Ray's start-up
still times out on a loaded machine. It prints the node's GCS address on one line; a caller connects to it as a
driver (`ray.init(address=...)`, which forks nothing).

For a training run (`engine_node`) the launcher also starts a `flower-superlink --simulation` on a free
loopback port, plaintext (loopback only), its state in the caller's directory. The SuperLink's SuperExec starts a
`flwr-simulation` process for each run submitted with `flwr run`; Flower's Ray backend calls `ray.init()` without
an address there, so `RAY_ADDRESS` in the SuperLink's environment (inherited by SuperExec and flwr-simulation)
makes it a driver of this node instead of starting a Ray of its own (ray/_private/worker.py, init: "use
RAY_ADDRESS to override if the address was left unspecified"). Flower's federation config cannot name an
address: its SimulationConfig carries only num_cpus, num_gpus, logging_level and log_to_driver as init_args
(flwr/proto/federation_config.proto, flwr/simulation/app.py `_run_simulation_settings`). The node's GCS port is
chosen before either starts (`RAY_GCS_SERVER_PORT`, which Ray's head node reads), so the SuperLink and its
SuperExec boot while Ray does; the launcher answers once both are up.

Everything stops when the caller closes the launcher's stdin, also when the caller dies: the SuperLink with what
it started (its SuperExec and flwr-simulation run in a session of their own, so they are found as its
descendants), then the node. The caller kills the launcher's process group (the node and the SuperLink) if that
takes too long, so a killed coordinator or test leaves no Ray and no SuperLink behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import CoordinatorError

__all__ = ["EngineNode", "RayHeadError", "engine_node", "ray_head"]

logger = logging.getLogger(__name__)

# Ray's own start-up gives up after 30 s (its GCS port file, then its raylet's registration), and this launcher
# tries that many times: the caller waits a little longer than all of them together.
START_ATTEMPTS = 3
START_SECONDS = START_ATTEMPTS * 75.0
# The SuperLink answers its health check within seconds; a few ports are tried in case one was taken meanwhile.
SUPERLINK_ATTEMPTS = 3
SUPERLINK_START_SECONDS = 60.0
STOP_SECONDS = 30.0
SUPERLINK_HOST = "127.0.0.1"  # plaintext: loopback only
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"  # ray/_private/ray_constants.py: the head node's GCS port, read at its start


class RayHeadError(CoordinatorError):
    """The training engine's Ray node, or its SuperLink, did not start."""


@dataclass(frozen=True)
class EngineNode:
    """A running simulation engine: the Ray node's GCS address and the SuperLink's (host:port, plaintext)."""

    ray_address: str
    superlink: str
    superlink_pid: int  # its SuperExec and each run's flwr-simulation are its descendants
    flwr_home: Path  # FLWR_HOME of the SuperLink's processes: `flwr` finds its connection here, Flower its apps


def _launcher_environment() -> dict[str, str]:
    env = dict(os.environ)
    # gRPC's fork handlers are what kills Ray's freshly forked children (see the module docstring); nothing Ray
    # starts relies on gRPC surviving a fork.
    env["GRPC_ENABLE_FORK_SUPPORT"] = "false"
    # The node must be a new one, never a cluster named by the environment or a `ray start` left on this machine.
    env.pop("RAY_ADDRESS", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"  # nothing leaves the machine
    env["FLWR_TELEMETRY_ENABLED"] = "0"  # nor from Flower's processes
    env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"  # Ray's own choice from 2.x on, without its warning
    env.setdefault("RAY_DEDUP_LOGS", "0")
    # Workers import the ServerApp's and ClientApp's modules, as with Flower's own ray.init.
    env["PYTHONPATH"] = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _stop(proc: subprocess.Popen[str]) -> None:
    """Ask the launcher to stop its node (stdin closed), then kill its process group if it does not."""
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    try:
        proc.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        logger.warning("Ray's node did not stop within %.0f s; killing it", STOP_SECONDS)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the node is left, also after a clean exit
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@contextlib.contextmanager
def _launched(options: list[str], verbose: bool, seconds: float) -> Iterator[dict[str, Any]]:
    """The launcher's answer ({"address": ..., and what `options` asked for}) while it runs."""
    command = [sys.executable, "-m", "server.fl.ray_head", *options]
    if verbose:
        command.append("--verbose")
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None if verbose else subprocess.DEVNULL,
        text=True,
        env=_launcher_environment(),
        start_new_session=True,  # its group is the node's: stopped as one, never together with the caller's
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], seconds)
        line = proc.stdout.readline() if ready else ""
        try:
            answer = json.loads(line) if line else {}
        except json.JSONDecodeError:
            answer = {"error": f"unexpected output {line[:200]!r}"}
        if "address" not in answer:
            why = answer.get("error") or (
                f"no answer within {seconds:.0f} s" if not ready else f"it exited with {proc.poll()}"
            )
            raise RayHeadError(f"the training engine's Ray node did not start: {why}")
        yield answer
    finally:
        _stop(proc)


@contextlib.contextmanager
def ray_head(num_cpus: int, verbose: bool = False) -> Iterator[str]:
    """A Ray node with `num_cpus` CPUs for the duration of the block: its GCS address, to pass to
    `ray.init(address=...)`. Raises RayHeadError when it does not start."""
    with _launched(["--num-cpus", str(num_cpus)], verbose, START_SECONDS) as answer:
        yield str(answer["address"])


@contextlib.contextmanager
def engine_node(num_cpus: int, state_dir: Path, verbose: bool = False) -> Iterator[EngineNode]:
    """A Ray node with `num_cpus` CPUs and a simulation SuperLink whose runs use it, for the duration of the block;
    the SuperLink keeps its state (database, log, Flower's FLWR_HOME) in `state_dir`. Raises RayHeadError when
    either does not start."""
    options = ["--num-cpus", str(num_cpus), "--superlink-dir", str(state_dir)]
    wait = START_SECONDS + SUPERLINK_ATTEMPTS * SUPERLINK_START_SECONDS
    with _launched(options, verbose, wait) as answer:
        if "superlink" not in answer:
            raise RayHeadError(f"the simulation SuperLink did not start: {answer.get('error', 'no address given')}")
        yield EngineNode(
            str(answer["address"]), str(answer["superlink"]), int(answer["superlink_pid"]), _flwr_home(state_dir)
        )


def _flwr_home(state_dir: Path) -> Path:
    return state_dir / "flwr-home"


def _start(num_cpus: int, verbose: bool, spare: int | None = None) -> str:
    """Start this process's Ray node, a few times if Ray's fixed start-up wait runs out: its GCS address. A failed
    attempt's processes are killed, but for the process `spare` (the SuperLink) and its descendants."""
    import ray

    last = ""
    for attempt in range(1, START_ATTEMPTS + 1):
        started = time.monotonic()
        try:
            context = ray.init(
                address="local",
                num_cpus=num_cpus,
                num_gpus=0,
                include_dashboard=False,
                logging_level=logging.INFO if verbose else logging.ERROR,
                log_to_driver=False,
            )
        except Exception as e:  # Ray raises bare Exception and RuntimeError for its start-up timeouts
            last = f"{type(e).__name__}: {e}"
            logger.warning("Ray's start-up attempt %d failed after %.0f s: %s", attempt, time.monotonic() - started, e)
            ray.shutdown()
            _kill_own_children(spare)
            if GCS_PORT_ENV in os.environ:  # the next attempt on another port, in case this one was taken
                from server.ingest.broker import free_port

                os.environ[GCS_PORT_ENV] = str(free_port(SUPERLINK_HOST))
            continue
        return str(context.address_info["gcs_address"])  # type: ignore[attr-defined]
    raise RayHeadError(f"{START_ATTEMPTS} attempts failed; the last: {last}")


def _kill_own_children(spare: int | None = None) -> None:
    """Whatever a failed start-up left (ray.init never finished, so ray.shutdown does not know its processes)."""
    import psutil  # type: ignore[import-untyped]

    spared: set[int] = set()
    if spare is not None:
        with contextlib.suppress(psutil.Error):
            spared = {spare, *(p.pid for p in psutil.Process(spare).children(recursive=True))}
    children = [p for p in psutil.Process().children(recursive=True) if p.pid not in spared]
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=10)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{SUPERLINK_HOST}:{port}/health", timeout=1.0) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


class _SuperLink:
    """The simulation SuperLink, in this launcher's process group, plaintext on a free loopback port."""

    def __init__(self, state_dir: Path, ray_address: str, verbose: bool) -> None:
        self.state_dir, self.ray_address, self.verbose = state_dir, ray_address, verbose
        self.log_path = state_dir / "superlink.log"
        _flwr_home(state_dir).mkdir(parents=True, exist_ok=True)
        self.port, self.proc = self._spawn()

    def _environment(self) -> dict[str, str]:
        """Inherited by its SuperExec and each run's flwr-simulation process."""
        env = dict(os.environ)  # the launcher's: gRPC fork support off, PYTHONPATH, no usage statistics or telemetry
        env.pop(GCS_PORT_ENV, None)
        env["RAY_ADDRESS"] = self.ray_address  # Flower's ray.init() attaches to this node (the module docstring)
        env["FLWR_HOME"] = str(_flwr_home(self.state_dir))  # apps are installed here, not in ~/.flwr
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        if not self.verbose:
            # Flower's INFO lines (every round's summary, every request) would travel from flwr-simulation through
            # the SuperLink's database to `flwr run --stream`, costing the run's CPUs for a log nobody reads.
            env["FLWR_LOG_LEVEL"] = "WARNING"
        # The SuperLink starts `flower-superexec`, and that `flwr-simulation`, by name: those beside this Python.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def _spawn(self) -> tuple[int, subprocess.Popen[bytes]]:
        from server.ingest.broker import free_port

        port = free_port(SUPERLINK_HOST)
        command = [
            str(Path(sys.executable).parent / "flower-superlink"),
            "--insecure",  # plaintext on loopback only
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            SUPERLINK_HOST,
            "--port",
            str(port),
            "--database",
            str(self.state_dir / "superlink.db"),
            "--disable-runtime-dependency-installation",  # the app is the installed fedfleet: nothing to install
        ]
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=None if self.verbose else log,
                stderr=None if self.verbose else subprocess.STDOUT,
                env=self._environment(),
            )
        return port, proc

    def ready(self) -> str:
        """Its address once it answers its health check. One that exited (its port was taken between choosing and
        binding it) is started again on another port, a few times."""
        last = ""
        for attempt in range(SUPERLINK_ATTEMPTS):
            if attempt:
                self.port, self.proc = self._spawn()
            deadline = time.monotonic() + SUPERLINK_START_SECONDS
            while self.proc.poll() is None and time.monotonic() < deadline:
                if _healthy(self.port):
                    return f"{SUPERLINK_HOST}:{self.port}"
                time.sleep(0.1)
            last = (
                f"exited with {self.proc.poll()}"
                if self.proc.poll() is not None
                else f"answered no health check within {SUPERLINK_START_SECONDS:.0f} s"
            )
            self.stop()
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:] if self.log_path.exists() else []
        raise RayHeadError(f"{SUPERLINK_ATTEMPTS} attempts failed; the last {last}: {' / '.join(tail)}")

    def stop(self) -> None:
        """Kill it and everything it started: its SuperExec and any flwr-simulation run in a session of their own,
        so this launcher's process group does not hold them; they are its descendants until it dies. Nothing of
        theirs is worth a graceful stop (the run's record is the coordinator's; their state dir is the caller's
        to delete), and a graceful one waits for their open connections: seconds."""
        import psutil

        try:
            family = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.Error:
            family = []
        for member in family:
            with contextlib.suppress(psutil.Error):
                member.kill()
        psutil.wait_procs(family, timeout=10)
        self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-cpus", type=int, required=True)
    parser.add_argument("--superlink-dir", type=Path, help="also start a simulation SuperLink; its state goes here")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    # The answer goes to the caller's pipe; anything Ray or its processes print goes to stderr instead.
    answer = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    import ray

    from server.ingest.broker import free_port

    # Ray's head node takes its GCS port from here, so the SuperLink, started first, knows the address its runs
    # attach to and boots while Ray does.
    gcs_port = free_port(SUPERLINK_HOST)
    os.environ[GCS_PORT_ENV] = str(gcs_port)
    link = (
        None
        if args.superlink_dir is None
        else _SuperLink(args.superlink_dir, f"{SUPERLINK_HOST}:{gcs_port}", args.verbose)
    )
    try:
        try:
            address = _start(args.num_cpus, args.verbose, spare=None if link is None else link.proc.pid)
        except RayHeadError as e:
            print(json.dumps({"error": str(e)}), file=answer, flush=True)
            return 1
        doc: dict[str, Any] = {"address": address}
        if link is not None:
            if not address.endswith(f":{gcs_port}"):  # Ray retried on another port: point the SuperLink there
                link.stop()
                link = _SuperLink(args.superlink_dir, address, args.verbose)
            try:
                doc["superlink"] = link.ready()
                doc["superlink_pid"] = link.proc.pid
            except RayHeadError as e:
                doc["error"] = str(e)
        print(json.dumps(doc), file=answer, flush=True)
        answer.close()
        sys.stdin.read()  # until the caller closes it or dies
    finally:
        if link is not None:
            link.stop()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
