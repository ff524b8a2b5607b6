"""After a broker restart, 200 real agents' reconnects are spread over the back-off window (issue 24): no second
of the broker's log holds more than a third of them, and every one is back within a bound.

The fleet, the broker and the measurement are benchmarks/reconnect_spread.py's (real agents in two worker
processes, a real Mosquitto stopped and started on its port, each device's first CONNECT after the restart
read from Mosquitto's own log with its epoch second). Before the agents spread their first reconnect over five
back-off steps, 110 of 200 came back in one second (equal jitter over one 2 s step spans only 1 s).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from simulations.processes import run_bounded

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "reconnect_spread.py"
DEVICES = 200
BACK_WITHIN_SECONDS = 25  # the 10 s spread window of the shipped retry_seconds, with room for a loaded machine


@pytest.mark.slow
@pytest.mark.broker
def test_two_hundred_agents_come_back_from_a_broker_restart_spread_out(tmp_path: Path) -> None:
    # Prepare / Execute: the shipped retry_seconds; an overrun kills the broker and the fleet with the benchmark.
    out = run_bounded(
        [sys.executable, str(BENCHMARK), "--devices", str(DEVICES), "--workers", "2", "--workdir", str(tmp_path)],
        timeout=240,
    )

    # Assert
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "reconnect_spread" and result["devices"] == DEVICES
    assert result["retry_seconds"] == 2.0  # what agents ship with, not a test setting
    assert result["reconnected"] == DEVICES
    assert result["busiest_second"] <= DEVICES / 3, out.stdout
    assert 0 <= result["first_second"] <= result["last_second"] <= BACK_WITHIN_SECONDS, out.stdout
    assert list(tmp_path.iterdir()) == []  # the fleet's and the broker's temporary tree is gone


def test_the_benchmark_refuses_an_empty_fleet_before_starting_anything(tmp_path: Path) -> None:
    out = run_bounded([sys.executable, str(BENCHMARK), "--devices", "0", "--workdir", str(tmp_path)], timeout=60)
    assert out.returncode == 2
    assert "--devices, --workers and --retry-seconds must be positive" in out.stderr
    assert list(tmp_path.iterdir()) == []
