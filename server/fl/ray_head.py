"""A Ray node of its own for each simulated training run, started from a fresh interpreter.

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
still times out on a loaded machine. It prints the node's GCS address on one line; the caller connects to it as a
driver (`ray.init(address=...)`, which forks nothing) and Flower, finding Ray initialised, uses that node. The
node is stopped when the caller closes the launcher's stdin, also when the caller dies: so a killed coordinator or
test leaves no Ray behind.
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
from collections.abc import Iterator

from server.errors import CoordinatorError

__all__ = ["RayHeadError", "ray_head"]

logger = logging.getLogger(__name__)

# Ray's own start-up gives up after 30 s (its GCS port file, then its raylet's registration), and this launcher
# tries that many times: the caller waits a little longer than all of them together.
START_ATTEMPTS = 3
START_SECONDS = START_ATTEMPTS * 75.0
STOP_SECONDS = 30.0


class RayHeadError(CoordinatorError):
    """The training engine's Ray node did not start."""


def _launcher_environment() -> dict[str, str]:
    env = dict(os.environ)
    # gRPC's fork handlers are what kills Ray's freshly forked children (see the module docstring); nothing Ray
    # starts relies on gRPC surviving a fork.
    env["GRPC_ENABLE_FORK_SUPPORT"] = "false"
    # The node must be a new one, never a cluster named by the environment or a `ray start` left on this machine.
    env.pop("RAY_ADDRESS", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"  # nothing leaves the machine
    env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"  # Ray's own choice from 2.x on, without its warning
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
def ray_head(num_cpus: int, verbose: bool = False) -> Iterator[str]:
    """A Ray node with `num_cpus` CPUs for the duration of the block: its GCS address, to pass to
    `ray.init(address=...)`. Raises RayHeadError when it does not start."""
    command = [sys.executable, "-m", "server.fl.ray_head", "--num-cpus", str(num_cpus)]
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
        ready, _, _ = select.select([proc.stdout], [], [], START_SECONDS)
        line = proc.stdout.readline() if ready else ""
        try:
            answer = json.loads(line) if line else {}
        except json.JSONDecodeError:
            answer = {"error": f"unexpected output {line[:200]!r}"}
        if "address" not in answer:
            why = answer.get("error") or (
                f"no answer within {START_SECONDS:.0f} s" if not ready else f"it exited with {proc.poll()}"
            )
            raise RayHeadError(f"the training engine's Ray node did not start: {why}")
        yield str(answer["address"])
    finally:
        _stop(proc)


def _start(num_cpus: int, verbose: bool) -> str:
    """Start this process's Ray node, a few times if Ray's fixed start-up wait runs out: its GCS address."""
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
            _kill_own_children()
            continue
        return str(context.address_info["gcs_address"])  # type: ignore[attr-defined]
    raise RayHeadError(f"{START_ATTEMPTS} attempts failed; the last: {last}")


def _kill_own_children() -> None:
    """Whatever a failed start-up left (ray.init never finished, so ray.shutdown does not know its processes)."""
    import psutil  # type: ignore[import-untyped]

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-cpus", type=int, required=True)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    # The answer goes to the caller's pipe; anything Ray or its processes print goes to stderr instead.
    answer = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        address = _start(args.num_cpus, args.verbose)
    except RayHeadError as e:
        print(json.dumps({"error": str(e)}), file=answer, flush=True)
        return 1
    print(json.dumps({"address": address}), file=answer, flush=True)
    answer.close()
    sys.stdin.read()  # until the caller closes it or dies
    import ray

    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
