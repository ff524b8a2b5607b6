"""Rehearsals: a scenario file (simulations/scenarios/NAME.toml) drives a simulated fleet through rollouts with
faults injected on a schedule, checks the outcome it expects from the coordinator's state, and leaves a report
(Markdown timeline and PNG plots).

A scenario has steps; the one step kind so far is a rollout of one of the rehearsal releases (base, healthy,
scrambled), with the `fedfleet rollout start` settings and `during` actions, each `after` N seconds from the
rollout's start: `sensor_fault` (site, kind noise|contrast|dead_pixels, strength), `clear_faults`,
`switch_off` (fraction of devices), `switch_on`, `restart_coordinator` (with its embedded broker).
`[expect]`: outcome (the last rollout's phase), gate (a gate that fired), decision and reason_contains (a
decision recorded), final_release (what every device ends on). Every run also checks that no telemetry window
was lost.
"""

from __future__ import annotations

import math
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.store.telemetry import TelemetryRecords
from simulations.rig import RELEASES, Rig
from simulations.workload import SensorFault

__all__ = ["SCENARIOS", "Scenario", "ScenarioError", "ScenarioResult", "load_scenario", "run_scenario"]

SCENARIOS = Path(__file__).parent / "scenarios"
_ROLLOUT_KEYS = {
    "canary": "--canary",
    "canary_by": "--canary-by",
    "waves": "--waves",
    "bake_seconds": "--bake",
    "silent_after_seconds": "--silent-after",
    "on_fail": "--on-fail",
    "min_samples": "--min-samples",
    "min_devices": "--min-devices",
    "gate_window_seconds": "--gate-window",
}
_ACTIONS = {"sensor_fault", "clear_faults", "switch_off", "switch_on", "restart_coordinator"}
_EXPECT = {"outcome", "gate", "decision", "reason_contains", "final_release", "download_resumed"}


class ScenarioError(ValueError):
    """A scenario file that cannot be run as written."""


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    steps: list[dict[str, Any]]
    expect: dict[str, Any]
    kind: str = "rollouts"  # or "closed-loop": train, drift, alarm, retrain, roll out (simulations/closed_loop.py)
    loop: dict[str, Any] = field(default_factory=dict)  # the closed loop's settings


def load_scenario(name_or_path: str) -> Scenario:
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIOS / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SCENARIOS.glob("*.toml")))
        raise ScenarioError(f"no scenario {name_or_path!r}; known: {known} (or a path to a .toml file)")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{path} is not valid TOML: {e}") from e
    if doc.get("kind") == "closed-loop":
        loop = doc.get("loop", {})
        unknown = set(loop) - {"rounds", "fault", "strength", "threshold"}
        if unknown:
            raise ScenarioError(f"{path}: unknown [loop] setting(s) {', '.join(sorted(unknown))}")
        return Scenario(str(doc.get("name", path.stem)), str(doc.get("description", "")), [], {}, "closed-loop", loop)
    steps = doc.get("steps", [])
    if not steps:
        raise ScenarioError(f"{path}: a scenario needs at least one [[steps]]")
    for i, step in enumerate(steps):
        if step.get("action") != "rollout" or step.get("release") not in RELEASES:
            raise ScenarioError(f"{path}: step {i + 1} must be action = 'rollout' of one of {', '.join(RELEASES)}")
        unknown = set(step) - set(_ROLLOUT_KEYS) - {"action", "release", "gates", "during", "cut_download"}
        if unknown:
            raise ScenarioError(f"{path}: step {i + 1} has unknown setting(s) {', '.join(sorted(unknown))}")
        for action in step.get("during", []):
            if action.get("action") not in _ACTIONS or not isinstance(action.get("after"), int | float):
                raise ScenarioError(
                    f"{path}: each `during` entry needs after = SECONDS and action in {sorted(_ACTIONS)}"
                )
    expect = doc.get("expect", {})
    if set(expect) - _EXPECT:
        raise ScenarioError(f"{path}: unknown expectation(s) {', '.join(sorted(set(expect) - _EXPECT))}")
    return Scenario(str(doc.get("name", path.stem)), str(doc.get("description", "")), steps, expect)


@dataclass
class ScenarioResult:
    scenario: str
    seed: int
    devices: int
    rollouts: list[dict[str, Any]] = field(default_factory=list)  # final status of each
    timeline: list[tuple[float, str]] = field(default_factory=list)  # (seconds, what happened)
    releases_over_time: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # unmet expectations
    lost_windows: int = 0
    started_ms: int = field(default_factory=lambda: int(time.time() * 1000))  # the run's clock: the plots' origin

    @property
    def passed(self) -> bool:
        return not self.failures

    def decisions(self) -> list[dict[str, Any]]:
        return [d for r in self.rollouts for d in r["decisions"]]


Progress = Callable[[str], None]


def run_scenario(
    scenario: Scenario,
    root: Path,
    devices: int = 20,
    seed: int = 0,
    progress: Progress = print,
    timeout: float = 240,
    after: Callable[[Rig, ScenarioResult], None] | None = None,
) -> ScenarioResult:
    """Run it on a fresh rig under `root`; `after` (e.g. the report) runs while the rig's data is still there."""
    result = ScenarioResult(scenario.name, seed, devices)
    rig = Rig(root, devices=devices, fleet_name="sim", seed=seed)
    started = time.monotonic()

    def note(what: str) -> None:
        result.timeline.append((time.monotonic() - started, what))
        progress(what)

    try:
        rig.setup()
        note(f"{devices} devices on {RELEASES['base']}")
        for step in scenario.steps:
            result.rollouts.append(_run_rollout(rig, step, note, result, started, timeout))
        result.lost_windows = drain_and_count_lost(rig)
        _check(scenario, rig, result)
        if after is not None:
            after(rig, result)
    finally:
        rig.stop()
    return result


def _rollout_args(step: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for key, flag in _ROLLOUT_KEYS.items():
        if key in step:
            value = step[key]
            args += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    for gate in step.get("gates", []):
        args += ["--gate", gate]
    return args


FINAL_PHASES = ("completed", "rolled_back", "aborted")
EVENTS_CHECKED = 10_000  # a rehearsal's device reports a few dozen update events; the checks read them all


@dataclass
class RolloutWatch:
    """Follows one rollout in the coordinator's database: each poll notes the decisions recorded since the last
    one, samples how many devices run each release, and returns the rollout's phase."""

    rig: Rig
    rollout_id: str
    note: Progress
    releases_over_time: list[tuple[float, dict[str, int]]]
    started: float  # time.monotonic() that the samples count from
    shown: int = 0

    def poll(self) -> str:
        rows = self.rig.decisions(self.rollout_id)
        for r in rows[self.shown :]:
            self.note(f"{self.rollout_id} wave {r['wave']}: {r['decision']} — {r['reason']}")
        self.shown = len(rows)
        counts = Counter(d["running_release"] for d in self.rig.store().devices())
        self.releases_over_time.append((time.monotonic() - self.started, dict(counts)))
        phase = self.rig.phase(self.rollout_id)
        assert phase is not None, f"{self.rollout_id} is not in the store"
        return phase


def _run_rollout(
    rig: Rig, step: dict[str, Any], note: Progress, result: ScenarioResult, started: float, timeout: float
) -> dict[str, Any]:
    release = RELEASES[step["release"]]
    if "cut_download" in step:
        assert rig.fleet is not None
        rig.fleet.cut_next_download(int(step["cut_download"]), note)
    rollout_id = rig.cli("rollout", "start", release, "--fleet", rig.fleet_name, *_rollout_args(step))["id"]
    note(f"{rollout_id}: rollout of {release} started")
    begun = time.monotonic()
    pending = sorted(step.get("during", []), key=lambda a: a["after"])
    off: list[int] = []
    watch = RolloutWatch(rig, rollout_id, note, result.releases_over_time, started)
    while True:
        elapsed = time.monotonic() - begun
        while pending and pending[0]["after"] <= elapsed:
            _act(rig, pending.pop(0), off, note)
        phase = watch.poll()
        if phase in FINAL_PHASES and not pending:
            return rig.status(rollout_id)
        if elapsed > timeout:
            raise TimeoutError(f"{rollout_id} still {phase} after {timeout:.0f} s")
        time.sleep(0.25)


def _act(rig: Rig, action: dict[str, Any], off: list[int], note: Progress) -> None:
    assert rig.fleet is not None and rig.fleet.workload is not None and rig.coordinator is not None
    agents = rig.fleet.fleet.agents
    kind = action["action"]
    if kind == "sensor_fault":
        fault = SensorFault(str(action["kind"]), float(action.get("strength", 0.5)))
        chosen = [a.config.device_id for a in agents if a.config.labels.get("site") == action["site"]]
        rig.fleet.workload.faults.update(dict.fromkeys(chosen, fault))
        note(f"sensor fault {fault.kind} ({fault.strength}) on {len(chosen)} devices of {action['site']}")
    elif kind == "clear_faults":
        rig.fleet.workload.faults.clear()
        note("sensor faults cleared")
    elif kind == "switch_off":
        off[:] = list(range(len(agents) - max(1, math.ceil(float(action["fraction"]) * len(agents))), len(agents)))
        rig.fleet.switch_off(off)
        note(f"{len(off)} devices switched off")
    elif kind == "switch_on":
        rig.fleet.switch_on(off)
        note(f"{len(off)} devices back on")
    elif kind == "restart_coordinator":
        rig.coordinator.kill()
        rig.coordinator.start()
        note("coordinator and its broker restarted")


def drain_and_count_lost(rig: Rig, timeout: float = 60) -> int:
    """Stop inferring, let every device deliver its windows, then count windows the coordinator lacks."""
    assert rig.fleet is not None and rig.fleet.workload is not None
    rig.fleet.workload.rate = 0.0
    agents = rig.fleet.fleet.agents
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(len(a.outbox) or a.recorder.due() for a in agents):
        time.sleep(0.5)
    lost = 0
    for a in agents:
        stored = TelemetryRecords(rig.store()).watermark(a.config.device_id)
        lost += max(0, a.outbox.acknowledged - stored) + len(a.outbox)
    return lost


def _check(scenario: Scenario, rig: Rig, result: ScenarioResult) -> None:
    expect = scenario.expect
    last = result.rollouts[-1]
    if "outcome" in expect and last["phase"] != expect["outcome"]:
        result.failures.append(f"outcome: expected {expect['outcome']}, got {last['phase']}")
    if "gate" in expect:
        fired = {g["metric"] for d in result.decisions() for g in d["gates"] if g["verdict"] == "fail"}
        if expect["gate"] not in fired:
            result.failures.append(f"gate: expected {expect['gate']} to fire; fired: {sorted(fired) or 'none'}")
    if "decision" in expect:
        matching = [d for d in result.decisions() if d["decision"] == expect["decision"]]
        needle = expect.get("reason_contains", "")
        if not any(needle in d["reason"] for d in matching):
            result.failures.append(f"decision: no {expect['decision']} decision with {needle!r} in its reason")
    if "final_release" in expect:
        release = RELEASES[expect["final_release"]]
        if rig.running(release) != result.devices:
            result.failures.append(f"final_release: {rig.running(release)} of {result.devices} devices on {release}")
    if expect.get("download_resumed"):
        # From the coordinator's state: the cut device reported the cut (a transient failure), then committed
        # the same assignment; the fault injector's note says from which byte the download resumed.
        cut = [step["cut_download"] for step in scenario.steps if "cut_download" in step]
        device = rig.fleet.fleet.device_id(int(cut[0])) if cut and rig.fleet else ""
        kinds = [
            e["kind"]
            for e in reversed(rig.store().events(device, limit=EVENTS_CHECKED))
            if e["kind"] == "committed" or "cut half way" in e["detail"]
        ]
        resumed = any("resumed from byte" in what for _, what in result.timeline)
        if not (resumed and "failed" in kinds and kinds[-1] == "committed"):
            result.failures.append(f"download_resumed: {device or 'no device'} events {kinds}, resumed {resumed}")
    if result.lost_windows:
        result.failures.append(f"telemetry: {result.lost_windows} windows never reached the coordinator")
