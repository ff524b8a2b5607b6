"""The fan-out benchmark at a toy size: it runs both paths through a real broker and coordinator and reports them.

No timing is asserted (these machines are too noisy for that); what is checked is that the figures it prints
are there, belong together, and that bad arguments are refused before anything starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.processes import run_bounded

FANOUT = Path(__file__).resolve().parents[2] / "benchmarks" / "fanout.py"


def _fanout(*args: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    # Below pytest's 300 s; an overrun kills the benchmark with its broker, coordinator and fleet.
    return run_bounded([sys.executable, str(FANOUT), *args, "--workdir", str(workdir)], timeout=240)


@pytest.mark.slow
@pytest.mark.broker
def test_fanout_measures_the_floor_before_and_after_and_reports_their_mean(tmp_path: Path) -> None:
    out = _fanout("--devices", "3", "--size-mb", "0.05", "--workers", "2", workdir=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "fanout" and result["devices"] == 3
    assert 0.04 < result["size_mb"] < 0.06
    before, after = result["floor_before_seconds"], result["floor_after_seconds"]
    assert before > 0 and after > 0 and result["seconds"] > 0
    assert result["floor_seconds"] == pytest.approx((before + after) / 2, abs=0.0011)
    # The ratio is taken before seconds and floor are rounded to the millisecond: bound it by what they round from
    s, f = result["seconds"], result["floor_seconds"]
    assert (s - 5e-4) / (f + 5e-4) - 0.005 <= result["ratio"] <= (s + 5e-4) / max(f - 5e-4, 1e-9) + 0.005
    assert result["cpu_seconds"] >= result["fleet_process_cpu_seconds"] > 0
    assert result["cpu_ratio"] == pytest.approx(result["cpu_seconds"] / result["floor_cpu_seconds"], rel=0.05)
    assert isinstance(result["page_cache_dropped"], bool)
    # Every update reaches the coordinator as its events and its end status at least: a count below two per
    # update is a counter that missed messages (one in the agents' busy process did), not a cheaper update
    assert result["device_messages_per_update"]["grpc"] >= 2
    assert "floor (before): 3 subscribers" in out.stdout and "floor (after): 3 subscribers" in out.stdout
    assert "fedfleet: 3 devices committed" in out.stdout
    assert list(tmp_path.iterdir()) == []  # the temporary tree, floors' files included, is gone


@pytest.mark.parametrize("args", [("--devices", "0"), ("--size-mb", "-1")])
def test_fanout_refuses_sizes_that_are_not_positive_before_starting_anything(
    tmp_path: Path, args: tuple[str, str]
) -> None:
    out = _fanout(*args, workdir=tmp_path)
    assert out.returncode == 2
    assert "--devices and --size-mb must be positive" in out.stderr
    assert list(tmp_path.iterdir()) == []


BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.parametrize(
    ("script", "args", "figures"),
    [
        ("drift_false_alarms.py", ["--trials", "20", "--per-bin", "10,30"], ["p_false_alarm", "threshold"]),
        ("ingest.py", ["--devices", "3", "--seconds", "2"], ["windows_per_second", "bare_windows_per_second", "lost"]),
        ("rollback.py", ["--devices", "4", "--rate", "100"], ["rollback_seconds", "bare_fanout_seconds", "met"]),
        ("agent_footprint.py", ["--inferences", "200", "--skip-venv"], ["rss_mb", "drift_cost_ratio"]),
        (
            "update_messages.py",
            ["--devices", "5", "--idle-seconds", "0.5"],
            ["messages", "coordinator_us_per_message", "bare_us_per_message", "ratio"],
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_each_benchmark_runs_small_and_ends_with_its_figures(
    script: str, args: list[str], figures: list[str], tmp_path: Path
) -> None:
    """Every benchmark, at a toy size: it finishes and its last line is one JSON object with its figures (the
    figures themselves are measured by hand: no timing is asserted here)."""
    out = run_bounded([sys.executable, str(BENCHMARKS / script), *args], timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == script.removesuffix(".py")
    assert all(key in result for key in figures), result
    assert result.get("lost", 0) == 0  # where a benchmark counts lost telemetry, none is lost


@pytest.mark.slow
@pytest.mark.broker
def test_fleet_scale_runs_tiny_through_the_mirror_and_reports_both_fleets_against_the_targets() -> None:
    """20 devices in 2 workers against 10 in one, through nginx: the JSON line carries both fleets' figures,
    the ratios between them and the targets, and every target was served by the mirror (no timing asserted)."""
    args = ["--devices", "20", "--workers", "2", "--baseline", "10", "--size-mb", "0.05"]
    out = run_bounded([sys.executable, str(BENCHMARKS / "fleet_scale.py"), *args], timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "fleet_scale" and result["mirror"] is True
    assert result["agent_options"] == {"share_models": True, "xnnpack": False}  # the simulated devices' models
    assert 0.04 < result["size_mb"] < 0.06
    for fleet, devices, workers in ((result["baseline"], 10, 1), (result["scale"], 20, 2)):
        assert (fleet["devices"], fleet["workers"], fleet["mirror_targets_served"]) == (devices, workers, devices)
        assert fleet["online_seconds"] > 0 and fleet["commit_seconds"] > 0
        assert set(fleet["coordinator_cpu_seconds"]) == {"online", "commit"}
        assert fleet["rss_per_device_mb"] >= fleet["pss_per_device_mb"] >= fleet["anon_pss_per_device_mb"] > 0
    base, scale = result["baseline"], result["scale"]
    online = (scale["online_seconds"] / 20) / (base["online_seconds"] / 10)
    assert result["ratio_online_per_device"] == pytest.approx(online, abs=0.001)
    assert result["targets"] == {"ratio_per_device_max": 1.5, "pss_per_device_mb_max": 0.4}
    assert result["met"]["online_ratio"] == (result["ratio_online_per_device"] <= 1.5)
    assert result["met"]["commit_ratio"] == (result["ratio_commit_per_device"] <= 1.5)
    assert result["met"]["memory"] == (scale["pss_per_device_mb"] <= 0.4)


ACCURACY = BENCHMARKS / "accuracy_vs_epsilon.py"


@pytest.mark.slow
@pytest.mark.ray
def test_accuracy_vs_epsilon_runs_tiny_and_ends_with_the_mean_accuracy_per_target(tmp_path: Path) -> None:
    """Two seeds of a 2-device, 2-round run at target ε 3 through fedfleet train's code path: the table and the
    JSON line carry each seed's accuracy and their mean and sd (the accuracy itself is measured by hand)."""
    args = ["--epsilon", "3", "--seeds", "0,1", "--rounds", "2", "--devices", "2"]
    out = run_bounded([sys.executable, str(ACCURACY), *args], timeout=280)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "accuracy_vs_epsilon" and result["seeds"] == [0, 1]
    assert (result["devices"], result["rounds"], result["accountant"]) == (2, 2, "rdp")
    seeds = result["accuracy"]["3"]
    assert len(seeds) == 2 and all(0 <= a <= 1 for a in seeds)
    assert result["mean_accuracy"] == {"3": pytest.approx(sum(seeds) / 2, abs=1e-4)}
    assert result["sd_accuracy"]["3"] == pytest.approx(abs(seeds[0] - seeds[1]) / 2**0.5, abs=2e-4)
    assert 0 < result["epsilon_reached"]["3"] <= 3.0
    assert "| 3 | " in out.stdout and "target ε 3, seed 1: accuracy" in out.stdout


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--epsilon", "0"], "a target ε must be a finite number > 0"),
        (["--epsilon", "3,x"], "'x' is neither a number nor 'none'"),
        (["--seeds", "0,a"], "seeds are whole numbers"),
        (["--devices", "0"], "clients must be 1..10000"),
    ],
)
def test_accuracy_vs_epsilon_refuses_bad_arguments_before_training(args: list[str], said: str) -> None:
    out = run_bounded([sys.executable, str(ACCURACY), *args], timeout=60)
    assert out.returncode == 2 and said in out.stderr, out.stderr
    assert out.stdout == ""  # nothing ran


DASHBOARD = BENCHMARKS / "dashboard_load.py"


@pytest.mark.slow
@pytest.mark.broker
def test_dashboard_load_with_prune_measures_while_serve_prunes_a_past_day_and_the_audit_chain_verifies() -> None:
    """Three devices and a past day of 120 windows each, serve's first prune 60 s after it starts, 10 rows a batch
    (36 batches with pauses, so the prune goes on after its first batch is seen): the pages are measured before,
    while and after pruning, each time with the measured device's page full (100 windows), the
    prune took exactly the past day (the live fleet's windows are younger than the policy's day), and the audit
    chain verifies after it (the latencies are measured by hand: no timing is asserted). A window every 0.1 s
    fills the page in 10 s; the idle phase ends about 35 s after serve starts on a loaded 2-core machine, and
    the benchmark exits non-zero if the prune began before it ended."""
    sizes = ["--devices", "3", "--workers", "1", "--requests", "3", "--rate", "20", "--telemetry-seconds", "0.1"]
    prune = ["--prune", "--day-windows", "120", "--prune-after", "60", "--prune-batch-rows", "10"]
    out = run_bounded([sys.executable, str(DASHBOARD), *sizes, *prune], timeout=280)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "dashboard_load" and result["devices"] == 3
    assert (result["past_windows"], result["day_windows"], result["prune_after_seconds"]) == (360, 120, 60)
    pruning = result["pruning"]
    assert min(result[phase]["device_windows"] for phase in ("idle", "pruning", "settled")) >= 100
    assert pruning["rows_pruned"]["telemetry"] == 360 and result["rows_pruned"] == 360
    assert pruning["windows_left"] == 0 and pruning["batches"] == 36  # 10 rows a batch: it lasts past the first
    assert set(pruning["pages"]) == set(result["idle"]["pages"]) == set(result["prune_p95_ratios"])
    assert set(result["settled"]["pages"]) == set(pruning["pages"])
    assert result["prune_p95_ratio"] == max(result["prune_p95_ratios"].values()) > 0
    assert result["live_update_prune_p95_ratio"] > 0 and "p95_ratio_max" in result  # the rollout's figures too
    assert result["audit_verified"] is True and result["audit_entries_checked"] > 0
    assert "0 of the past day's 360 windows left" in out.stdout
