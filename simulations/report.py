"""The report a rehearsal leaves: summary.md (what was expected and what happened, the timeline of decisions
and why, each wave's outcome) and PNG plots (devices per release over time; input drift per site over time
against the gate threshold, with the rollback moments marked)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from simulations.closed_loop import ClosedLoopResult, drift_by_release
from simulations.rig import Rig
from simulations.scenario import Scenario, ScenarioResult, drift_by_site

__all__ = ["write_loop_report", "write_report"]


def write_report(scenario: Scenario, rig: Rig, result: ScenarioResult, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _releases_plot(result, out / "devices-per-release.png"),
        _drift_plot(rig, result, out / "drift-by-site.png"),
    ]
    lines = [
        f"# Rehearsal: {scenario.name}",
        "",
        scenario.description,
        "",
        f"- devices: {result.devices}, seed: {result.seed}",
        f"- verdict: **{'passed' if result.passed else 'FAILED'}**"
        + ("" if result.passed else " — " + "; ".join(result.failures)),
        f"- expected: {json.dumps(scenario.expect)}",
        f"- telemetry windows lost: {result.lost_windows}",
        "",
        "## Rollouts",
        "",
    ]
    for r in result.rollouts:
        lines += [f"### {r['id']}: {r['release']} → {r['phase']}", "", "| wave | devices by state |", "| --- | --- |"]
        lines += [f"| {w['name']} | {', '.join(f'{k} {v}' for k, v in w['devices'].items())} |" for w in r["waves"]]
        lines += ["", "| wave | decision | reason |", "| --- | --- | --- |"]
        lines += [f"| {d['wave']} | {d['decision']} | {d['reason']} |" for d in r["decisions"]]
        lines.append("")
    return [_summary(out, lines, result.timeline, written), *written]


def _summary(out: Path, lines: list[str], timeline: list[tuple[float, str]], plots: list[Path]) -> Path:
    """summary.md: the report's own lines, then the timeline and the plots."""
    lines = [*lines, "## Timeline", "", "| seconds | what |", "| --- | --- |"]
    lines += [f"| {t:.1f} | {what} |" for t, what in timeline]
    lines += ["", "## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    return summary


def _finish(fig: Figure, ax: Axes, path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _releases_plot(result: ScenarioResult | ClosedLoopResult, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    releases = sorted({k for _, counts in result.releases_over_time for k in counts if k})
    times = [t for t, _ in result.releases_over_time]
    for release in releases:
        ax.plot(times, [counts.get(release, 0) for _, counts in result.releases_over_time], label=release)
    return _finish(fig, ax, path, "Devices per release", "seconds since the run started", "devices running")


def _drift_plot(rig: Rig, result: ScenarioResult, path: Path) -> Path:
    t0, series = drift_by_site(rig)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for site, points in sorted(series.items()):
        ax.plot([t for t, _ in points], [v for _, v in points], marker=".", label=site)
    gates = [g for r in result.rollouts for g in r["spec"]["gates"] if g["metric"] == "input_max_psi"]
    for threshold in sorted({g["threshold"] for g in gates}):
        ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"gate input_max_psi {threshold:g}")
    for d in result.decisions():
        if d["decision"] in ("rollback", "hold"):
            ax.axvline((d["at"] - t0) / 1000, color="grey", linestyle=":", linewidth=1)
    xlabel = "seconds since the first telemetry window (dotted: rollback or hold)"
    return _finish(fig, ax, path, "Input drift per site", xlabel, "largest feature PSI")


def write_loop_report(result: ClosedLoopResult, rig: Rig, out: Path, passed: bool, failures: list[str]) -> list[Path]:
    """The closed loop's report: summary.md (timeline, trainings, rollout, drift) and its PNG plots."""
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _training_plot(result, out / "accuracy-and-epsilon.png"),
        _releases_plot(result, out / "devices-per-release.png"),
        _loop_drift_plot(rig, result, out / "drift-over-time.png"),
    ]
    verdict = "**the loop closed**" if passed else "**FAILED**: " + "; ".join(failures)
    lines = [
        "# fedfleet demo: the closed loop",
        "",
        f"- verdict: {verdict}",
        f"- releases: {', '.join(result.releases)}",
    ]
    for label, reading in (("before the fault", result.drift_before), ("after", result.drift_after)):
        if reading is not None and reading.value is not None:
            lines.append(f"- drift {label}: {reading.describe()}")
    if result.alarm is not None:
        a = result.alarm
        lines.append(
            f"- the coordinator's drift alarm {a['id']}: {a['metric']} {a['value']:.3f} > {a['threshold']:g} on "
            f"{a['release_id']} ({a['state']}{': ' + a['resolution'] if a['resolution'] else ''})"
        )
    if result.job is not None:
        j = result.job
        lines.append(
            f"- retrain job {j['id']} ({j['state']}): {j['cause']}; trained {j['model_version'] or '-'} in run "
            f"{j['run_id'] or '-'}, released {j['release_id'] or '-'}, rolled out as {j['rollout_id'] or '-'}"
        )
    lines += [
        f"- largest lifetime ε of a device: {result.max_lifetime_epsilon:.3f} (budget {result.budget:g})",
        f"- telemetry windows lost: {result.lost_windows}",
        "- accuracy below is on the coordinator's held-out split of clean digits (the devices' drifted data stays"
        " on the devices)",
        "",
    ]
    for outcome in result.trainings:
        lines += [
            f"## Training {outcome.model_version} ({outcome.run_id})",
            "",
            "| round | accuracy | ε (max) |",
            "| --- | --- | --- |",
        ]
        for r in outcome.rounds:
            eps = "-" if r["epsilon_max"] is None else f"{r['epsilon_max']:.3f}"
            lines.append(f"| {r['round']} | {r['test_accuracy']:.4f} | {eps} |")
        lines.append("")
    if result.rollout:
        r = result.rollout
        lines += [
            f"## {r['id']}: {r['release']} → {r['phase']}",
            "",
            "| wave | decision | reason |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {d['wave']} | {d['decision']} | {d['reason']} |" for d in r["decisions"]]
        lines.append("")
    return [_summary(out, lines, result.timeline, written), *written]


def _training_plot(result: ClosedLoopResult, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    eps_ax = ax.twinx()
    for outcome in result.trainings:
        rounds = [r["round"] for r in outcome.rounds]
        ax.plot(
            rounds, [r["test_accuracy"] for r in outcome.rounds], marker="o", label=f"{outcome.model_version} accuracy"
        )
        private = [(r["round"], r["epsilon_max"]) for r in outcome.rounds if r["epsilon_max"] is not None]
        eps_ax.plot(
            [a for a, _ in private],
            [b for _, b in private],
            linestyle="--",
            marker="x",
            label=f"{outcome.model_version} ε",
        )
    eps_ax.set_ylabel("ε spent in the run (max over devices)")
    eps_ax.legend(loc="lower right")
    return _finish(fig, ax, path, "Held-out accuracy and ε per round", "round", "accuracy")


def _loop_drift_plot(rig: Rig, result: ClosedLoopResult, path: Path) -> Path:
    series = drift_by_release(rig)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for release, points in sorted(series.items()):
        ax.plot([t for t, _ in points], [v for _, v in points], marker=".", label=f"windows on {release}")
    if result.alarm is not None:
        ax.axhline(result.alarm["threshold"], color="red", linestyle="--", linewidth=1, label="retrain threshold")
    ax.set_yscale("symlog", linthresh=0.1)  # a drifted sensor's PSI runs into the tens; the threshold is 0.25
    title = "Fleet input drift against each release's reference"
    return _finish(fig, ax, path, title, "seconds since the first window", "largest feature PSI")
