"""The ServerApp: runs on the coordinator (in the `flwr-simulation` process of a simulation SuperLink, or as a
deployment SuperLink's ServerApp) and owns the run's bookkeeping in the coordinator's SQLite database.

A run: greet every node (device id, examples held, its owner's consent), leave out every device without consent to
train (the device's own word, and the coordinator's record of it: `_consents`), then `plan.rounds` rounds of
FleetFedAvg — each round picks devices that still have privacy budget, trains, records each device's ε in the
ledger (the larger of what it reported and what the coordinator recomputes from the plan and its noise, sample
rate and steps: `_Run.account`; a disagreement is an `epsilon-mismatch` incident and an audit entry) and each
failure or refusal with its device and round, aggregates in device order (so a seed gives one model), and
evaluates the global model on the coordinator's held-out split — then computes the drift reference federatedly
and registers the model version with its lineage (which lists the devices that consented to the run).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

import server
from edge_agent.contract.drift import DriftReference, edges_from_fine_histograms, proportions
from server import audit
from server.datadir import DataDir
from server.errors import CoordinatorError
from server.fl.data import CLASSES, FEATURE_RANGE, FEATURES, held_out
from server.fl.device_dp import AdaptiveClipping, DeviceAccounting, device_accounting, noise_generator, poisson_sample
from server.fl.model import evaluate, initial_weights
from server.fl.plan import TrainPlan
from server.fl.privacy import EpsilonCheck, History, check_epsilon, epsilon_of, noise_for_target, steps_per_round
from server.fl.private_counts import PURPOSE as REFERENCE_PURPOSE
from server.fl.private_counts import epsilon_after, l2_sensitivity, pooled_counts
from server.fl.private_counts import noise_multiplier as reference_noise
from server.fl.progress import RoundProgress
from server.fl.records import as_float, as_int, as_str
from server.fl.registry import Ledger, Registry, TrainingRuns
from server.store import Store
from server.store.consent import ConsentRecords

__all__ = ["RoundProgress", "build_server_app", "consenting_devices"]

logger = logging.getLogger(__name__)

REFERENCE_BINS = 10
FINE_BINS = 100
HELLO_TIMEOUT = 120.0


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^([\w.]+(?:Error|Exception|Exceeded)): (.+)$")


def error_summary(reason: str) -> str:
    """The client's own exception line out of the traceback Flower (and Ray) wrap around it, e.g.
    "server.errors.CoordinatorError: device privacy record … is unreadable", followed by the traceback's tail."""
    lines = [line.strip() for line in _ANSI.sub("", reason).splitlines() if line.strip()]
    own = [
        line
        for line in lines
        if _EXCEPTION_LINE.match(line) and not line.startswith(("ray.", "flwr.")) and "ClientAppException" not in line
    ]
    head = own[-1] if own else (lines[-1] if lines else "no reason given")
    return head if len(head) > 1000 else f"{head}\n{reason[-1000:]}"


class TrainingError(CoordinatorError):
    """The run could not train (no nodes, every client failed)."""


@dataclass
class _Device:
    node_id: int
    device_id: str
    examples: int
    noise: float | None = None  # the noise multiplier charged, learnt from its first reply
    history: History = field(default_factory=list)  # the accountant history charged in this run (check_epsilon)
    trained: int = 0  # rounds it trained in this run
    epsilon: float = 0.0  # its ε in this run as the ledger records it
    spent_before: float = 0.0  # lifetime ε from earlier runs (the ledger, read once at the greeting)
    budget: float = 0.0  # its lifetime budget (ditto)
    refused: bool = False
    skipped: bool = False
    reference_answers: int = 0  # drift-reference queries it answered in this run


@dataclass
class _Round:
    started: float
    selected: int = 0
    completed: int = 0
    refused: int = 0
    failed: int = 0
    train_loss: float | None = None
    incidents: list[dict[str, str]] = field(default_factory=list)


class _Run:
    """One run's coordinator-side state: devices, ledger, per-round tallies."""

    def __init__(
        self, run_id: str, plan: TrainPlan, store: Store, budget: float, require_consent: bool = False
    ) -> None:
        self.run_id, self.plan, self.store = run_id, plan, store
        self.require_consent = require_consent  # the policy's [consent] require_consent
        self.consented: list[str] = []  # the greeted devices that consented to this run (the lineage lists them)
        self.without_consent: list[str] = []  # greeted, left out for want of consent
        self.ledger = Ledger(store, budget)
        self.runs = TrainingRuns(store)
        self.devices: dict[int, _Device] = {}
        self.round: _Round = _Round(time.monotonic())
        self.reference_privacy: dict[str, Any] = {}  # how the drift reference was noised (the model card says)
        self.device_level: _DeviceLevel | None = None  # the device privacy unit's mechanism, once greeted

    def incident(self, server_round: int, device_id: str, kind: str, detail: str) -> None:
        self.runs.incident(self.run_id, server_round, device_id, kind, detail)
        self.round.incidents.append({"device": device_id, "kind": kind, "detail": detail})
        logger.info("round %s: device %s %s: %s", server_round, device_id, kind, detail)

    def base_config(self) -> ConfigRecord:
        p = self.plan
        return ConfigRecord(
            {
                "run-id": self.run_id,
                "seed": p.seed,
                "data-seed": p.seed,
                "alpha": p.alpha,
                "private": p.private and p.privacy_unit == "record",  # device unit: the coordinator adds the noise
                "target-epsilon": p.target_epsilon if p.target_epsilon is not None else -1.0,
                "noise-multiplier": p.noise_multiplier if p.noise_multiplier is not None else -1.0,
                "delta": p.delta,
                "max-grad-norm": p.max_grad_norm,
                "planned-rounds": p.rounds,
                "local-epochs": p.local_epochs,
                "batch-size": p.batch_size,
                "lr": p.lr,
                "secure-mode": p.secure_mode,
                "seeded-noise": p.seeded_noise,
                "accountant": p.accountant,
            }
        )

    def projected_epsilon(self, d: _Device) -> float:
        """The run ε the device would report after one more round (what its own check computes). Before its
        first reply under a target ε, the target itself: the device's noise is chosen to end the run there."""
        p = self.plan
        rate, steps = steps_per_round(d.examples, p.batch_size, p.local_epochs)
        if d.noise is None and p.target_epsilon is not None:
            return p.target_epsilon
        noise = d.noise if d.noise is not None else p.noise_multiplier
        assert noise is not None
        return max(d.epsilon, epsilon_of([*d.history, (noise, rate, steps)], p.delta, p.accountant))

    def plan_noise(self, d: _Device) -> float:
        """The noise multiplier the plan gives the device: the fixed one, or the one its target ε implies for its
        sample rate over the planned rounds (what the device itself computes)."""
        p = self.plan
        if p.target_epsilon is None:
            assert p.noise_multiplier is not None
            return p.noise_multiplier
        rate, steps = steps_per_round(d.examples, p.batch_size, p.local_epochs)
        return noise_for_target(p.target_epsilon, p.delta, rate, p.rounds * steps, p.accountant)

    def account(self, server_round: int, d: _Device, metrics: MetricRecord) -> EpsilonCheck:
        """Charge the device for the round it trained: recompute its ε from the plan and its reported noise,
        sample rate and steps, record the larger of that and its own figure (never below what the ledger holds),
        and record a disagreement as an incident and an audit entry. Joins the caller's transaction."""
        p = self.plan
        d.trained += 1
        rate, steps = steps_per_round(d.examples, p.batch_size, p.local_epochs)
        reported, history = _reported_accounting(metrics)
        check = check_epsilon(
            reported,
            history,
            delta=p.delta,
            sample_rate=rate,
            min_steps=d.trained * steps,
            max_noise=self.plan_noise(d),
            previous=d.epsilon,
            accountant=p.accountant,
        )
        d.history = check.charged
        d.noise = min(z for z, _, _ in check.charged)
        d.epsilon = self.ledger.record(
            self.run_id,
            d.device_id,
            server_round,
            check.recorded,
            p.delta,
            reported=check.reported,
            recomputed=check.recomputed,
            mismatch=check.mismatch,
        )
        if check.mismatch:
            shown = "unreadable" if math.isnan(check.reported) else f"{check.reported:.4f}"
            self.incident(
                server_round,
                d.device_id,
                "epsilon-mismatch",
                f"reported ε {shown}, recomputed {check.recomputed:.4f}, recorded {d.epsilon:.4f}: "
                + "; ".join(check.problems)
                + ("" if check.history_usable else "; its update was not aggregated"),
            )
            audit.append(
                self.store,
                "privacy.epsilon_mismatch",
                d.device_id,
                {
                    "run": self.run_id,
                    "round": server_round,
                    "reported_epsilon": None if math.isnan(check.reported) else check.reported,
                    "recomputed_epsilon": check.recomputed,
                    "recorded_epsilon": d.epsilon,
                    "delta": p.delta,
                    "problems": list(check.problems),
                },
            )
        return check

    def select(self, server_round: int) -> list[_Device]:
        eligible = []
        for d in sorted(self.devices.values(), key=lambda d: d.device_id):
            if d.refused or d.skipped:
                continue
            if self.plan.private:
                after = d.spent_before + self.projected_epsilon(d)
                if after > d.budget + 1e-9:
                    d.skipped = True
                    detail = f"(spent before this run {d.spent_before:.3f}), budget {d.budget:.3f}"
                    self.incident(
                        server_round, d.device_id, "skipped-budget", f"lifetime ε would reach {after:.3f} {detail}"
                    )
                    continue
            eligible.append(d)
        k = self.plan.clients_per_round
        if k and len(eligible) > k:
            rng = np.random.default_rng([self.plan.seed, server_round])
            picked = sorted(rng.choice(len(eligible), size=k, replace=False).tolist())
            eligible = [eligible[i] for i in picked]
        return eligible


def _reported_accounting(metrics: MetricRecord) -> tuple[float | None, History | None]:
    """The ε a client reported and its accountant history (None for what is missing or malformed). A client
    without the history lists (an older one) is read from its single noise multiplier, sample rate and steps."""
    try:
        reported: float | None = as_float(metrics, "epsilon")
    except (KeyError, TypeError, ValueError):
        reported = None
    try:
        if "accountant-noise" in metrics:
            z, q, n = (metrics[k] for k in ("accountant-noise", "accountant-rate", "accountant-steps"))
            if not (isinstance(z, list) and isinstance(q, list) and isinstance(n, list)):
                raise TypeError("accountant history entries are not lists")
            history: History | None = [(float(a), float(b), int(c)) for a, b, c in zip(z, q, n, strict=True)]
        else:
            keys = ("noise-multiplier", "sample-rate", "history-steps")
            history = [(as_float(metrics, keys[0]), as_float(metrics, keys[1]), as_int(metrics, keys[2]))]
    except (KeyError, TypeError, ValueError):
        history = None
    return reported, history


class _DeviceLevel:
    """The device privacy unit's coordinator side (server/fl/device_dp.py): the population with budget for the
    whole run, Poisson sampling, the accountant, and adaptive clipping with noise on the aggregate."""

    def __init__(self, run: _Run, population: list[_Device], accounting: DeviceAccounting) -> None:
        self.run, self.population, self.accounting = run, population, accounting
        self.rng = noise_generator(run.plan)
        self.clipping = AdaptiveClipping(accounting, self.rng, run.plan.device_clip_norm)
        self.clipping_norms: list[float] = []  # C of each round, for the lineage

    @classmethod
    def start(cls, run: _Run) -> _DeviceLevel:
        """Leave out the devices without budget for the run's final device-level ε (each a `skipped-budget`
        incident); the smaller population raises the sample rate and so the ε, so repeat until all fit."""
        plan = run.plan
        population = sorted(run.devices.values(), key=lambda d: d.device_id)
        while True:
            accounting = device_accounting(plan, len(population))
            final = accounting.epsilon(plan.rounds)
            room = [d for d in population if d.spent_before + final <= d.budget + 1e-9]
            if len(room) == len(population):
                break
            if not room:
                raise TrainingError(
                    f"no device has privacy budget for this run's device-level ε {final:.3f}; see `fedfleet privacy "
                    "ledger`, raise budgets with `fedfleet privacy budget`, or plan a smaller ε"
                )
            population = room
        for d in sorted(run.devices.values(), key=lambda d: d.device_id):
            if d not in population:
                d.skipped = True
                run.incident(
                    0,
                    d.device_id,
                    "skipped-budget",
                    f"lifetime ε would reach {d.spent_before + final:.3f} (spent before this run "
                    f"{d.spent_before:.3f}), budget {d.budget:.3f}",
                )
        return cls(run, population, accounting)

    def sample(self) -> list[_Device]:
        return poisson_sample(self.population, self.accounting.sample_rate, self.rng)

    def charge(self, server_round: int) -> None:
        """Every device of the population spends the run's device-level ε after this round, sampled or not
        (the guarantee holds for each of them). Joins the caller's transaction."""
        eps = self.accounting.epsilon(server_round)
        for d in self.population:
            d.trained = server_round
            d.noise = self.accounting.noise_multiplier
            d.history = self.accounting.history(server_round)
            d.epsilon = self.run.ledger.record(
                self.run.run_id, d.device_id, server_round, eps, self.run.plan.delta, recomputed=eps
            )

    def aggregate(self, current: ArrayRecord, replies: list[Message]) -> ArrayRecord:
        updates = [msg.content["arrays"].to_numpy_ndarrays() for msg in replies]  # type: ignore[union-attr]
        new, clip = self.clipping.aggregate(current.to_numpy_ndarrays(), updates)
        self.clipping_norms.append(clip.clipping_norm)
        logger.info(
            "device-level DP: %d updates (%d within C = %.4f), noise sd %.4g, next C %.4f",
            clip.devices,
            clip.unclipped,
            clip.clipping_norm,
            clip.noise_stddev,
            clip.next_clipping_norm,
        )
        return ArrayRecord(numpy_ndarrays=new)


class FleetFedAvg(FedAvg):
    """FedAvg that picks devices by the privacy ledger, records every reply, and aggregates in device order."""

    def __init__(self, run: _Run) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
        self.run = run
        self.current_arrays = ArrayRecord()  # the global weights sent this round (device-level clipping)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        run = self.run
        run.round = _Round(time.monotonic())
        self.current_arrays = arrays
        # Device unit: a Poisson sample of the population, which may be empty (the round still releases noise).
        chosen = run.device_level.sample() if run.device_level else run.select(server_round)
        if not chosen and not run.device_level and all(d.skipped or d.refused for d in run.devices.values()):
            raise TrainingError(
                f"no device can take part in round {server_round}: all {len(run.devices)} have too little privacy "
                "budget left or refused; see `fedfleet privacy ledger`, raise budgets with `fedfleet privacy "
                "budget`, or plan a smaller ε"
            )
        run.round.selected = len(chosen)
        messages = []
        for d in chosen:
            cfg = ConfigRecord(
                {
                    **dict(config),
                    "server-round": server_round,
                    "lifetime-epsilon": d.spent_before,
                    "epsilon-budget": d.budget,
                }
            )
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=d.node_id))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        run = self.run
        ok: list[tuple[str, Message]] = []
        losses: list[tuple[float, int]] = []
        with run.store.transaction():
            for msg in replies:
                d = run.devices.get(msg.metadata.src_node_id)
                device_id = d.device_id if d else f"node-{msg.metadata.src_node_id}"
                if msg.has_error():
                    run.round.failed += 1
                    run.incident(
                        server_round,
                        device_id,
                        "error",
                        error_summary(msg.error.reason or f"error code {msg.error.code}"),
                    )
                    continue
                if "refusal" in msg.content:
                    run.round.refused += 1
                    if d:
                        d.refused = True
                    refusal = msg.content["refusal"]
                    assert isinstance(refusal, ConfigRecord)
                    run.incident(server_round, device_id, "refused", as_str(refusal, "reason"))
                    continue
                metrics = msg.content["metrics"]
                assert isinstance(metrics, MetricRecord)
                if (
                    run.plan.private
                    and not run.device_level
                    and d is not None
                    and not run.account(server_round, d, metrics).history_usable
                ):
                    run.round.failed += 1  # charged from the plan (it did train), but not aggregated
                    continue
                losses.append((as_float(metrics, "train-loss"), as_int(metrics, "num-examples")))
                ok.append((device_id, msg))
        run.round.completed = len(ok)
        if losses:
            run.round.train_loss = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
        ok.sort(key=lambda pair: pair[0])  # device order: the same seed aggregates to the same bits
        if run.device_level:
            with run.store.transaction():
                run.device_level.charge(server_round)  # before the noised model exists
            return run.device_level.aggregate(self.current_arrays, [msg for _, msg in ok]), None
        return super().aggregate_train(server_round, [msg for _, msg in ok])


def _query(
    grid: Grid, nodes: Iterable[int], config: dict[str, Any], timeout: float, arrays: ArrayRecord | None = None
) -> list[Message]:
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {"config": ConfigRecord(config)}
    if arrays is not None:
        records["arrays"] = arrays
    messages = [Message(content=RecordDict(records), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    return list(grid.send_and_receive(messages, timeout=timeout))


def _greet(grid: Grid, run: _Run) -> None:
    deadline = time.monotonic() + HELLO_TIMEOUT
    while len(node_ids := list(grid.get_node_ids())) < run.plan.clients:
        if time.monotonic() > deadline:
            raise TrainingError(
                f"only {len(node_ids)} of {run.plan.clients} nodes connected within {HELLO_TIMEOUT:.0f} s"
            )
        time.sleep(0.5)
    config = {"task": "hello", "alpha": run.plan.alpha, "data-seed": run.plan.seed}
    for msg in _query(grid, sorted(node_ids), config, run.plan.round_timeout):
        if msg.has_error():
            run.incident(
                0, f"node-{msg.metadata.src_node_id}", "error", msg.error.reason or f"error code {msg.error.code}"
            )
            continue
        info = msg.content["client"]
        assert isinstance(info, ConfigRecord)
        device_id = as_str(info, "device-id")
        if not _consents(run, device_id, info):
            continue
        device = _Device(
            msg.metadata.src_node_id,
            device_id,
            as_int(info, "num-examples"),
            spent_before=run.ledger.lifetime(device_id, excluding_run=run.run_id),
            budget=run.ledger.budget(device_id),
        )
        run.devices[device.node_id] = device
    if not run.devices:
        if run.without_consent:
            raise TrainingError(
                f"no device consented to training: {len(run.without_consent)} greeted without consent "
                f"({', '.join(run.without_consent[:10])}); a device's owner grants it in agent.toml ([consent] "
                "training = true)"
            )
        raise TrainingError("no node answered the greeting")


def consenting_devices(store: Store, device_ids: Iterable[str], require_consent: bool) -> frozenset[str]:
    """The devices the coordinator's records let train: a recorded consent says yes, or none is recorded and the
    policy does not require one. (A simulation's devices consent exactly so: they stand in for these devices.)"""
    current = ConsentRecords(store).all_current()
    return frozenset(d for d in device_ids if (current[d]["granted"] if d in current else not require_consent))


def _consents(run: _Run, device_id: str, info: ConfigRecord) -> bool:
    """Whether a greeted device takes part: its own ClientApp says its owner consented (`consent-training` in its
    hello), and the coordinator's record of the owner's consent does not say no — nor is missing, when the policy
    requires consent. Either way the run records the device's consent as it stood; one without it is a
    `skipped-consent` incident and is never asked anything again in the run."""
    record = ConsentRecords(run.store).current(device_id)
    says = info.get("consent-training") is True
    if record is not None:
        recorded, why = (
            bool(record["granted"]),
            f"its consent recorded {'granted' if record['granted'] else 'withdrawn'}",
        )
    else:
        recorded, why = not run.require_consent, "no consent recorded (the policy requires it)"
    granted = says and recorded
    with run.store.transaction():
        ConsentRecords(run.store).record_run(run.run_id, device_id, granted, record["id"] if record else None)
    if granted:
        run.consented.append(device_id)
        return True
    run.without_consent.append(device_id)
    detail = "the device itself does not consent (its owner's agent.toml)" if not says else why
    run.incident(0, device_id, "skipped-consent", f"not trained on: {detail}")
    return False


def _reference(grid: Grid, run: _Run, arrays: ArrayRecord) -> DriftReference:
    """Drift reference from pooled, noised bin counts: fine histograms give quantile edges, then counts over those
    edges and over the top-class score. Clients send counts only, never samples, each count with Gaussian noise
    (server/fl/private_counts.py) charged to the device's budget; the ledger records each answer's ε under the
    purpose `drift-reference`. Only devices with room in their budget for the plan's reference ε are asked; the
    reference is built from the devices that answered both queries' (a device refusing the first is not asked
    the second). The per-feature ranges are the public schema bounds (FEATURE_RANGE), never the data's."""
    p = run.plan
    lo, hi = FEATURE_RANGE
    noise = 0.0 if p.exact_reference else reference_noise(p.reference_epsilon, p.delta)
    round_ = p.rounds + 1  # the incidents' round: after the last training round
    asked: list[_Device] = []
    for d in sorted(run.devices.values(), key=lambda d: d.device_id):
        if d.refused:
            continue
        if p.exact_reference:  # a lab plan: devices that allow it answer exactly, and nothing is charged
            asked.append(d)
            continue
        # Its lifetime as the ledger holds it, this run's training included whatever the privacy unit.
        after = run.ledger.lifetime(d.device_id) + p.reference_epsilon
        if after > d.budget + 1e-9:
            detail = f"drift reference: lifetime ε would reach {after:.3f}, budget {d.budget:.3f}"
            run.incident(round_, d.device_id, "skipped-budget", detail)
            continue
        asked.append(d)
    config = {
        "alpha": p.alpha,
        "data-seed": p.seed,
        "run-id": run.run_id,
        "reference-epsilon": p.reference_epsilon,
        "delta": p.delta,
        "exact-reference": p.exact_reference,
    }
    fine_config = {**config, "task": "feature-histogram", "range-lo": lo, "range-hi": hi, "fine-bins": FINE_BINS}
    answers, asked = _ask_reference(grid, run, asked, fine_config, None, noise, [(FEATURES, FINE_BINS + 2)])
    if not answers:
        raise TrainingError(
            f"no device answered the drift reference's feature-histogram query ({len(run.devices)} in the run: each "
            f"refused, failed, or lacked privacy budget for the reference's ε {p.reference_epsilon:g}); see the "
            "run's incidents, raise budgets with `fedfleet privacy budget`, or plan a smaller reference_epsilon"
        )
    fine = _rows_or_uniform(pooled_counts([a[0] for a in answers]))
    feature_edges, _ = edges_from_fine_histograms(fine, lo, hi, REFERENCE_BINS)
    score_edges = np.linspace(0, 1, 11)[1:-1]
    payload = ArrayRecord(numpy_ndarrays=[feature_edges, score_edges, *arrays.to_numpy_ndarrays()])
    shapes = [(FEATURES, REFERENCE_BINS), (len(score_edges) + 1,)]
    answers, answered = _ask_reference(grid, run, asked, {**config, "task": "reference-counts"}, payload, noise, shapes)
    if not answers:
        raise TrainingError("no device answered the drift reference's reference-counts query; see the run's incidents")
    counts = _rows_or_uniform(pooled_counts([a[0] for a in answers]))
    score_counts = _rows_or_uniform(pooled_counts([a[1] for a in answers])[None, :])[0]
    # How loud the noise is against the signal (from the noised counts: post-processing): the pooled sd per bin,
    # and the records per reference bin (each feature's noised total, averaged over the features).
    pooled_sd = noise * l2_sensitivity(FEATURES + 1) * math.sqrt(len(answered))
    records = max(float(np.mean(np.sum([a[0] for a in answers], axis=0).sum(axis=1))), 0.0)
    if not p.exact_reference and pooled_sd > 0.1 * records / REFERENCE_BINS:
        logger.warning(
            "run %s: the drift reference's noise (sd %.0f counts per bin, %d devices) is large against its "
            "about %.0f records per bin; drift statistics against it will be noisy (more devices or a larger "
            "reference_epsilon)",
            run.run_id,
            pooled_sd,
            len(answered),
            records / REFERENCE_BINS,
        )
    common = {
        "unit": "record",
        "devices": sorted(d.device_id for d in answered),
        "feature_ranges": f"public schema bounds [{lo:g}, {hi:g}]",
    }
    if p.exact_reference:
        run.reference_privacy = {
            **common,
            "exact": True,
            "mechanism": (
                "exact bin counts (lab plan exact_reference, answered only by devices that allow it): not private; "
                "whoever receives them, the coordinator first, sees each device's histograms"
            ),
        }
    else:
        run.reference_privacy = {
            **common,
            "pooled_noise_sd_per_bin": pooled_sd,
            "records_estimate": round(records),
            "epsilon": p.reference_epsilon,
            "delta": p.delta,
            "mechanism": (
                "Gaussian on each device's bin counts (feature-histogram, then reference-counts), L2 sensitivity "
                "√(histograms per answer) to adding or removing one record; both answers one RDP accountant "
                "(Opacus, sample rate 1, 2 steps); noise from device-local entropy; pooled counts clipped at 0"
            ),
            "noise_multiplier": noise,
        }
    return DriftReference(
        feature_edges=feature_edges,
        feature_proportions=proportions(counts),
        feature_ranges=np.tile(np.array([lo, hi], dtype=np.float64), (FEATURES, 1)),
        score_edges=score_edges,
        score_proportions=proportions(score_counts),
        n_classes=CLASSES,
    )


def _ask_reference(
    grid: Grid,
    run: _Run,
    devices: list[_Device],
    config: dict[str, Any],
    arrays: ArrayRecord | None,
    noise: float,
    shapes: list[tuple[int, ...]],
) -> tuple[list[list[np.ndarray]], list[_Device]]:
    """Ask each device one drift-reference query (with its own budget), charge every answer in the ledger at the
    larger of the ε the device reports and the one the coordinator computes for its answers so far at `noise`,
    and record refusals and failures as incidents. Returns the well-formed answers and the devices that gave
    them."""
    p, task = run.plan, str(config["task"])
    by_node = {d.node_id: d for d in devices}
    messages = []
    for device in devices:
        records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
            "config": ConfigRecord({**config, "epsilon-budget": device.budget})
        }
        if arrays is not None:
            records["arrays"] = arrays
        messages.append(
            Message(content=RecordDict(records), message_type=MessageType.QUERY, dst_node_id=device.node_id)
        )
    answers: list[list[np.ndarray]] = []
    answered: list[_Device] = []
    round_ = p.rounds + 1
    with run.store.transaction():
        for msg in grid.send_and_receive(messages, timeout=p.round_timeout):
            d = by_node.get(msg.metadata.src_node_id)
            if d is None:
                continue
            if msg.has_error():
                detail = error_summary(msg.error.reason or f"error code {msg.error.code}")
                run.incident(round_, d.device_id, "error", f"drift reference ({task}): {detail}")
                continue
            if "refusal" in msg.content:
                refusal = msg.content["refusal"]
                assert isinstance(refusal, ConfigRecord)
                run.incident(round_, d.device_id, "refused", as_str(refusal, "reason"))
                continue
            d.reference_answers += 1
            metrics = msg.content["metrics"] if "metrics" in msg.content else MetricRecord({})
            assert isinstance(metrics, MetricRecord)
            try:
                reported: float | None = as_float(metrics, "epsilon")
            except (KeyError, TypeError, ValueError):
                reported = None
            claimed = reported if reported is not None and math.isfinite(reported) and reported >= 0 else 0.0
            if not p.exact_reference:  # exact counts carry no ε to charge (the model card says they are not private)
                run.ledger.record_query(
                    run.run_id,
                    d.device_id,
                    REFERENCE_PURPOSE,
                    d.reference_answers,
                    task,
                    max(epsilon_after(noise, p.delta, d.reference_answers), claimed),
                    p.delta,
                    noise_multiplier=noise,
                    sensitivity=l2_sensitivity(sum(1 if len(s) == 1 else s[0] for s in shapes)),
                    reported=reported,
                )
            counts = msg.content.get("counts")
            got = counts.to_numpy_ndarrays() if isinstance(counts, ArrayRecord) else []
            if [a.shape for a in got] != shapes or not all(np.isfinite(a).all() for a in got):
                run.incident(round_, d.device_id, "error", f"drift reference ({task}): malformed counts, not pooled")
                continue
            answers.append(got)
            answered.append(d)
    answered.sort(key=lambda d: d.device_id)
    return answers, answered


def _rows_or_uniform(counts: np.ndarray) -> np.ndarray:
    """Pooled (clipped) counts with every row that the noise left empty made uniform: post-processing, so that
    edges and proportions exist for every feature."""
    out = np.array(counts, dtype=np.float64)
    out[out.sum(axis=-1) <= 0] = 1.0
    return out


def _unit_privacy(run: _Run) -> dict[str, Any]:
    """The model card's privacy fields that depend on the unit (they replace the record unit's where both name
    one): what the ε protects, and for the device unit the mechanism and its accountant."""
    p, level = run.plan, run.device_level
    if not p.private:
        return {"unit": None}
    if level is None:
        return {"unit": "record", "protects": "one training example of one device, also against the coordinator"}
    a = level.accounting
    return {
        "unit": "device",
        "protects": (
            "a device's whole training data, against anyone who sees the released model; central DP: the "
            "coordinator sees each device's update and adds the noise itself, so not against the coordinator"
        ),
        "accountant": (
            f"rdp (Opacus), DP-FedAvg: {p.rounds} rounds of the sampled Gaussian mechanism, noise multiplier "
            f"{a.noise_multiplier:.6g} (updates and clipped count together), device sample rate {a.sample_rate:.6g}"
        ),
        "noise_multiplier_range": [a.noise_multiplier, a.noise_multiplier],
        "max_grad_norm": None,
        "noise_source": (
            "coordinator, seeded from the plan (lab): not private against whoever reads this card"
            if p.seeded_noise
            else "coordinator, operating-system entropy"
        ),
        "device_level": {
            "population": a.population,
            "sample_rate": a.sample_rate,
            "expected_devices_per_round": a.expected_clients,
            "noise_multiplier": a.noise_multiplier,
            "update_noise_multiplier": a.update_noise_multiplier,
            "clipped_count_stddev": a.count_stddev,
            "clipping": "adaptive (Andrew et al. 2021), target unclipped quantile 0.5, learning rate 0.2",
            "clipping_norms": level.clipping_norms,
        },
    }


def _lineage(run: _Run, engine: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    p = run.plan
    trained = (
        sorted(run.ledger.devices(run.run_id))
        if p.private
        else sorted(d.device_id for d in run.devices.values() if not d.refused)
    )
    noises = [d.noise for d in run.devices.values() if d.noise is not None]
    last = rounds[-1]
    return {
        "engine": engine,
        "rounds": p.rounds,
        "clients_per_round": p.clients_per_round or len(run.devices),
        "devices": trained,
        "consent": {
            "required": run.require_consent,
            "devices": sorted(run.consented),
            "without_consent": sorted(run.without_consent),
        },
        "data": {
            "source": f"scikit-learn digits, non-IID Dirichlet(alpha={p.alpha}) split, seed {p.seed}"
            + (f", {p.data_label}" if p.data_label else ""),
            "features": FEATURES,
            "classes": CLASSES,
            "feature_range": list(FEATURE_RANGE),
            "schema": {"input": [1, FEATURES], "output": [1, CLASSES], "output_kind": "class probabilities"},
        },
        "code_version": f"fedfleet {server.__version__}",
        "cause": p.cause,
        "plan": p.to_dict(),
        "privacy": {
            "epsilon": max((d.epsilon for d in run.devices.values()), default=0.0) if p.private else None,
            "delta": p.delta if p.private else None,
            "accountant": (
                f"{p.accountant} (Opacus' {p.accountant.upper()} accountant): each device's history kept in its "
                "durable record across rounds; every reported ε recomputed by the coordinator with the same "
                "accountant, the larger recorded"
            )
            if p.private
            else None,
            "noise_multiplier_range": [min(noises), max(noises)] if noises else None,
            "max_grad_norm": p.max_grad_norm if p.private else None,
            "target_epsilon": p.target_epsilon,
            "secure_mode": p.secure_mode,
            "noise_source": (
                "seeded from the plan (lab): not private against the coordinator"
                if p.seeded_noise
                else "device-local entropy"
            )
            if p.private
            else None,
        }
        | _unit_privacy(run)
        | {"drift_reference": run.reference_privacy or None},
        "metrics": {
            "test_accuracy": last["test_accuracy"],
            "test_loss": last["test_loss"],
            "per_round": [
                {
                    k: r[k]
                    for k in (
                        "round",
                        "test_accuracy",
                        "test_loss",
                        "train_loss",
                        "epsilon_max",
                        "completed",
                        "refused",
                        "failed",
                    )
                }
                for r in rounds
            ],
        },
    }


def build_server_app(
    data_dir: Path | None = None,
    plan: TrainPlan | None = None,
    run_id: str | None = None,
    engine: str = "simulation",
    on_round: Callable[[RoundProgress], None] | None = None,
) -> ServerApp:
    """A ServerApp bound to a coordinator data directory and plan; without them (`flwr run`, on a SuperLink or
    the simulation engine) everything comes from the run config: `data-dir`, `plan` (a JSON object of TrainPlan
    fields), and optionally `run-id` (the id the caller waits for; "": a new one) and `engine` (what the lineage
    names: "deployment" unless the caller says "simulation")."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = context.run_config
        d = DataDir(data_dir if data_dir is not None else Path(str(cfg["data-dir"])))
        p = plan if plan is not None else TrainPlan.from_dict(json.loads(str(cfg.get("plan", "{}"))))
        rid = run_id or str(cfg.get("run-id", "")) or f"run-{uuid.uuid4().hex[:12]}"
        kind = engine if plan is not None else str(cfg.get("engine", "deployment"))
        if p.privacy_unit == "device":
            device_accounting(p, p.clients)  # refuse a combination that cannot work before anything is recorded
        with d.store() as store:
            _train(grid, d, store, p, rid, kind, on_round)

    return app


def _train(
    grid: Grid,
    d: DataDir,
    store: Store,
    plan: TrainPlan,
    run_id: str,
    engine: str,
    on_round: Callable[[RoundProgress], None] | None,
) -> None:
    run = _Run(run_id, plan, store, d.config().epsilon_budget, d.policy().require_consent)
    run.runs.start(run_id, plan.model_name, engine, plan.to_dict())
    try:
        registry = Registry(store)
        weights = registry.get(plan.parent).weights if plan.parent else initial_weights(plan.seed)
        _greet(grid, run)
        if plan.privacy_unit == "device":
            run.device_level = _DeviceLevel.start(run)
        x_test, y_test = held_out(plan.seed)
        rounds: list[dict[str, Any]] = []

        def centralized(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            loss, accuracy = evaluate(arrays.to_numpy_ndarrays(), x_test, y_test)
            r = run.round
            eps = (
                max((dev.epsilon for dev in run.devices.values()), default=0.0)
                if plan.private and server_round
                else None
            )
            row = {
                "round": server_round,
                "selected": r.selected,
                "completed": r.completed,
                "refused": r.refused,
                "failed": r.failed,
                "train_loss": r.train_loss,
                "test_loss": loss,
                "test_accuracy": accuracy,
                "epsilon_max": eps,
                "seconds": time.monotonic() - r.started,
            }
            run.runs.record_round(run_id, row)
            rounds.append(row)
            if on_round is not None:
                on_round(RoundProgress(run_id=run_id, rounds=plan.rounds, incidents=list(r.incidents), **row))  # type: ignore[arg-type]
            return MetricRecord({"accuracy": accuracy, "loss": loss})

        strategy = FleetFedAvg(run)
        run.round = _Round(time.monotonic())  # round 0 (the initial evaluation) starts here, after the greeting
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(numpy_ndarrays=weights),
            num_rounds=plan.rounds,
            timeout=plan.round_timeout,
            train_config=run.base_config(),
            evaluate_fn=centralized,
        )
        if not any(r["completed"] for r in rounds):
            raise TrainingError("no client completed a round; the incidents name each device's error")
        final = result.arrays
        reference = _reference(grid, run, final)
        registry.register(
            plan.model_name,
            run_id,
            plan.parent,
            final.to_numpy_ndarrays(),
            _lineage(run, engine, rounds),
            reference.to_metadata(),
        )
    except TrainingError as e:
        run.runs.finish(run_id, "failed", error=str(e))
        raise
    except BaseException as e:
        run.runs.finish(run_id, "failed", error=f"{type(e).__name__}: {e}")
        logger.error("training run %s failed: %s", run_id, traceback.format_exc())
        raise


# For Flower's deployment engine: `flwr run` with run config `data-dir` and `plan`.
app = build_server_app()
