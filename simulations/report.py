"""The report a rehearsal leaves: summary.md (what was expected and what happened, the timeline of decisions
and why, each wave's outcome) and PNG plots (devices per release over time; input drift over time against the
gate or retrain threshold), both time plots on the run's clock with the loop's moments marked (fault, alarm,
retraining, each wave's start, hold, rollback, completion). What is plotted comes from simulations/report_data.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from edge_agent.contract.drift import DriftReference
from simulations.closed_loop import ClosedLoopResult
from simulations.report_data import Moment, Series, bucketed_drift, decision_moments, loop_moments, references_of
from simulations.rig import RELEASES, Rig
from simulations.scenario import Scenario, ScenarioResult

__all__ = ["release_drift", "site_drift", "write_loop_report", "write_report"]


def write_report(scenario: Scenario, rig: Rig, result: ScenarioResult, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    series = site_drift(rig, result)
    moments = decision_moments(result.rollouts, result.started_ms)
    xlim = _time_range(result, series, moments)
    written = [
        _releases_plot(result, out / "devices-per-release.png", moments, xlim),
        _drift_plot(rig, result, series, moments, xlim, out / "drift-by-site.png"),
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
    _legend_below(fig, [ax])
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _legend_below(fig: Figure, axes: list[Axes]) -> None:
    """One legend for every axis' lines, under the plot, where it hides no line and no label."""
    handles, labels, seen = [], [], set()
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in seen:
                seen.add(label)
                handles.append(handle)
                labels.append(label)
    fig.tight_layout()
    if handles:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(labels)))


# How each kind of moment is marked: colour and line style of its vertical line.
_MARKS = {
    "fault": ("tab:brown", "-."),
    "alarm": ("red", "-"),
    "retrain": ("tab:purple", "-"),
    "rollout": ("tab:blue", ":"),
    "hold": ("tab:orange", ":"),
    "rollback": ("black", "--"),
    "completed": ("tab:green", ":"),
    "rolled back": ("grey", "--"),
}


def _mark(ax: Axes, moments: list[Moment]) -> None:
    """A vertical line at each moment; the legend names each kind once."""
    named: set[str] = set()
    for m in moments:
        colour, style = _MARKS.get(m.kind, ("grey", ":"))
        label = None if m.kind in named else m.kind
        named.add(m.kind)
        ax.axvline(m.seconds, color=colour, linestyle=style, linewidth=1, alpha=0.8, label=label)


_RUN_CLOCK = "seconds since the run started"


def _releases_plot(
    result: ScenarioResult | ClosedLoopResult, path: Path, moments: list[Moment], xlim: tuple[float, float]
) -> Path:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    releases = sorted({k for _, counts in result.releases_over_time for k in counts if k})
    times = [t for t, _ in result.releases_over_time]
    for release in releases:
        ax.step(times, [counts.get(release, 0) for _, counts in result.releases_over_time], where="post", label=release)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _mark(ax, moments)
    ax.set_xlim(*xlim)
    return _finish(fig, ax, path, "Devices per release", _RUN_CLOCK, "devices running")


def _time_range(
    result: ScenarioResult | ClosedLoopResult, series: Series, moments: list[Moment]
) -> tuple[float, float]:
    """The span both time plots show, from the first sample or moment of either to the last, so their time
    axes are the same."""
    times = [t for t, _ in result.releases_over_time] + [m.seconds for m in moments]
    times += [t for points in series.values() for t, _ in points]
    if not times:
        return 0.0, 1.0
    lo, hi = min(times), max(times)
    margin = max(1.0, (hi - lo) * 0.03)
    return max(0.0, lo - margin), hi + margin


def _telemetry(rig: Rig) -> list[dict[str, Any]]:
    return rig.store_query("SELECT device_id, release_id, end_ms, payload FROM telemetry ORDER BY end_ms")


def _drift_plot(
    rig: Rig, result: ScenarioResult, series: Series, moments: list[Moment], xlim: tuple[float, float], path: Path
) -> Path:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for site, points in sorted(series.items()):
        ax.plot([t for t, _ in points], [v for _, v in points], marker=".", label=site)
    gates = [g for r in result.rollouts for g in r["spec"]["gates"] if g["metric"] == "input_max_psi"]
    for threshold in sorted({g["threshold"] for g in gates}):
        ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"gate input_max_psi {threshold:g}")
    _mark(ax, moments)
    ax.set_xlim(*xlim)
    ax.set_ylim(bottom=0)
    return _finish(
        fig,
        ax,
        path,
        "Input drift per site (every release against the base release's reference)",
        _RUN_CLOCK,
        "largest feature PSI",
    )


def site_drift(rig: Rig, result: ScenarioResult) -> Series:
    """The scenario's input drift per site. Every rehearsal release's reference shares the base release's
    feature bins, so the base reference scores the windows of all."""
    store = rig.store()
    reference = DriftReference.from_metadata(store.release(RELEASES["base"]).custom["drift_reference"])
    sites = {d["id"]: str(d["labels"].get("site", "?")) for d in store.devices()}
    return bucketed_drift(
        _telemetry(rig), lambda row: sites.get(row["device_id"], "?"), lambda _: reference, result.started_ms
    )


def write_loop_report(result: ClosedLoopResult, rig: Rig, out: Path, passed: bool, failures: list[str]) -> list[Path]:
    """The closed loop's report: summary.md (timeline, trainings, rollout, drift) and its PNG plots."""
    out.mkdir(parents=True, exist_ok=True)
    series = release_drift(rig, result)
    moments = loop_moments(result.started_ms, result.fault_seconds, result.alarm, result.job, result.rollout)
    xlim = _time_range(result, series, moments)
    written = [
        _training_plot(result, out / "accuracy-and-epsilon.png"),
        _releases_plot(result, out / "devices-per-release.png", moments, xlim),
        _loop_drift_plot(result, series, moments, xlim, out / "drift-over-time.png"),
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
    """One panel per training (the first model, then the retraining), side by side: accuracy on the left axis,
    ε spent on the right, rounds as whole numbers. Each training spends its own ε, so their curves would lie on
    top of each other in one panel."""
    trainings = result.trainings or []
    fig, axes = plt.subplots(1, max(1, len(trainings)), figsize=(8, 3.5), sharey=True, squeeze=False)
    eps_axes: list[Axes] = []
    top = max((r["epsilon_max"] or 0.0 for t in trainings for r in t.rounds), default=0.0)
    for ax, outcome in zip(axes[0], trainings, strict=False):
        rounds = [r["round"] for r in outcome.rounds]
        ax.plot(rounds, [r["test_accuracy"] for r in outcome.rounds], marker="o", color="tab:blue", label="accuracy")
        eps_ax = ax.twinx()
        private = [(r["round"], r["epsilon_max"]) for r in outcome.rounds if r["epsilon_max"] is not None]
        eps_ax.plot(
            [a for a, _ in private],
            [b for _, b in private],
            linestyle="--",
            marker="x",
            color="tab:red",
            label="ε spent in the run (max over devices)",
        )
        eps_ax.set_ylim(0, top * 1.1 or 1.0)
        eps_axes.append(eps_ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(outcome.model_version or outcome.run_id, fontsize="medium")
        ax.set_xlabel("round")
    axes[0][0].set_ylabel("held-out accuracy")
    if eps_axes:
        eps_axes[-1].set_ylabel("ε")
    for eps_ax in eps_axes[:-1]:
        eps_ax.tick_params(labelright=False)
    fig.suptitle("Held-out accuracy and ε per round")
    _legend_below(fig, [axes[0][0], *eps_axes[:1]])
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def release_drift(rig: Rig, result: ClosedLoopResult) -> Series:
    """The fleet's input drift per release, each release's windows against its own reference."""
    references = references_of((r.id, r.custom) for r in rig.store().releases())
    return bucketed_drift(_telemetry(rig), lambda row: str(row["release_id"]), references.get, result.started_ms)


def _loop_drift_plot(
    result: ClosedLoopResult, series: Series, moments: list[Moment], xlim: tuple[float, float], path: Path
) -> Path:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for release, points in sorted(series.items()):
        ax.plot([t for t, _ in points], [v for _, v in points], marker=".", label=f"windows on {release}")
    if result.alarm is not None:
        threshold = float(result.alarm["threshold"])
        ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"retrain threshold {threshold:g}")
    # A drifted sensor's PSI runs into the tens and the threshold is 0.25: a log axis, ticks as plain numbers.
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.5, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    _mark(ax, moments)
    ax.set_xlim(*xlim)
    title = "Fleet input drift against each release's reference"
    return _finish(fig, ax, path, title, _RUN_CLOCK, "largest feature PSI")
