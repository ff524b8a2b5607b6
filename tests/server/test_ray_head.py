"""The training engine's Ray node: started from a launcher process of its own (server/fl/ray_head.py says why),
used by a driver in this process, and gone with its caller."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest

from server.fl.ray_head import ray_head
from simulations.processes import descendants
from tests.support import group_members, holder_process, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _launchers(pid: int) -> list[int]:
    """The Ray launchers (`python -m server.fl.ray_head`) among a process's descendants."""
    found = []
    for p in descendants(pid):
        try:
            argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"server.fl.ray_head" in argv:
            found.append(p)
    return found


def test_a_node_of_its_own_runs_a_drivers_tasks_and_stops_with_its_block(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # as training sets it: no FutureWarning
    before = set(descendants(os.getpid()))  # what the session runs already (its Mosquitto, say)

    with ray_head(1) as address:
        (launcher,) = _launchers(os.getpid())
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        try:

            @ray.remote
            def double(x: int) -> int:
                return 2 * x

            assert ray.get([double.remote(i) for i in range(3)]) == [0, 2, 4]
            assert ray.cluster_resources()["CPU"] == 1.0  # type: ignore[no-untyped-call]
        finally:
            ray.shutdown()
        # Every Ray process runs in the launcher's group, none in this process's own.
        node = group_members(launcher)
        assert len(node) > 2 and launcher in node
        assert not [p for p in set(descendants(os.getpid())) - before if os.getpgid(p) != launcher]
    assert group_members(launcher) == []
    assert set(descendants(os.getpid())) - before == set()


def test_the_node_stops_when_its_caller_is_killed(tmp_path: Path) -> None:
    code = (
        "import time\n"
        "from server.fl.ray_head import ray_head\n"
        "with ray_head(1) as address:\n"
        "    print(address, flush=True)\n"
        "    time.sleep(600)\n"
    )
    with holder_process(code, what="the caller's node") as caller:
        (launcher,) = _launchers(caller.pid)
        assert len(group_members(launcher)) > 2
        os.killpg(caller.pid, signal.SIGKILL)  # no cleanup of its own: the launcher notices its stdin closed
        caller.wait(10)
        wait_for(lambda: group_members(launcher) == [], 60, what="the orphaned Ray node to stop")
