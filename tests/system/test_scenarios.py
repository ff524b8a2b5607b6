"""Each rehearsal scenario at a small size, its outcome read from the coordinator's state; the same seed gives
the same decisions; `fedfleet simulate` leaves a report and says clearly what it cannot run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from simulations.processes import run_bounded
from simulations.scenario import SCENARIOS, ScenarioError, load_scenario, run_scenario

NAMES = sorted(p.stem for p in SCENARIOS.glob("*.toml"))
ROLLOUT_NAMES = [n for n in NAMES if n != "closed-loop"]  # the closed loop runs in test_loop_system (`fedfleet demo`)


def test_every_scenario_file_is_listed_and_loads() -> None:
    assert NAMES == ["bad-release", "closed-loop", "cohort-drift", "faults", "healthy"]
    for name in ROLLOUT_NAMES:
        assert load_scenario(name).steps
    loop = load_scenario("closed-loop")
    assert loop.kind == "closed-loop" and loop.loop["fault"] == "contrast"


@pytest.mark.slow
@pytest.mark.parametrize("name", ROLLOUT_NAMES)
def test_scenario_ends_as_it_expects_with_no_window_lost(name: str, tmp_path: Path) -> None:
    scenario = load_scenario(name)
    result = run_scenario(scenario, tmp_path, devices=9, seed=1, progress=lambda s: None)
    assert result.passed, result.failures
    assert result.lost_windows == 0
    assert result.rollouts[-1]["phase"] == scenario.expect["outcome"]


@pytest.mark.slow
def test_the_same_seed_gives_the_same_decisions(tmp_path: Path) -> None:
    scenario = load_scenario("bad-release")

    def decisions(run: str) -> list[tuple[int, str, tuple[str, ...]]]:
        result = run_scenario(scenario, tmp_path / run, devices=9, seed=5, progress=lambda s: None)
        return [
            (d["wave"], d["decision"], tuple(sorted(g["metric"] for g in d["gates"] if g["verdict"] == "fail")))
            for d in result.decisions()
            if d["decision"] != "waiting"  # how often evidence was short depends on timing, not on the seed
        ]

    first = decisions("a")
    assert first == decisions("b")
    assert [d for _, d, _ in first] == ["created", "start", "rollback", "rolled_back"]


def test_bad_scenario_files_are_refused_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    for text, message in (
        ("", "at least one"),
        ('[[steps]]\naction = "rollout"\nrelease = "mystery"\n', "must be action = 'rollout'"),
        ('[[steps]]\naction = "rollout"\nrelease = "healthy"\nbake = 1\n', "unknown setting"),
        (
            '[[steps]]\naction = "rollout"\nrelease = "healthy"\nduring = [{ action = "explode", after = 1 }]\n',
            "during",
        ),
        ('[[steps]]\naction = "rollout"\nrelease = "healthy"\n[expect]\nmood = "good"\n', "unknown expectation"),
        ('kind = "closed-loop"\n[loop]\nrounds = 2\nweather = "rain"\n', "unknown \\[loop\\] setting"),
    ):
        bad.write_text(text)
        with pytest.raises(ScenarioError, match=message):
            load_scenario(str(bad))
    with pytest.raises(ScenarioError, match="known: bad-release, closed-loop, cohort-drift, faults, healthy"):
        load_scenario("nope")


@pytest.mark.slow
def test_simulate_command_leaves_a_report(tmp_path: Path) -> None:
    report = tmp_path / "report"
    args = ["simulate", "--scenario", "bad-release", "--devices", "6", "--report", str(report)]
    out = run_bounded([sys.executable, "-m", "simulations.cli", *args], timeout=240)  # below pytest's 300 s
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bad-release: passed" in out.stdout
    summary = (report / "summary.md").read_text()
    assert "verdict: **passed**" in summary and "class_mix_shift" in summary
    for png in ("devices-per-release.png", "drift-by-site.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--scenario", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 1 and "no scenario 'nope'" in missing.stdout
