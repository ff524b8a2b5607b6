"""Device-level (user-level) differential privacy: DP-FedAvg with adaptive clipping, noised by the coordinator.

The privacy unit is a device's whole contribution (all its data, every round), not one record. Each round:

1. every device of the population (the devices with budget for the whole run) is sampled independently with
   probability q = clients per round / population (Poisson sampling, from the coordinator's own entropy);
2. the sampled devices train without DP noise of their own and send their weights;
3. the coordinator clips each device's update (new weights minus the global ones) to the L2 norm C (Flower's
   `adaptive_clip_inputs_inplace`: FlatClip), adds the clipped updates up with equal weight, divides by the
   expected number of devices m = q x population (the fixed denominator of DP-FedAvg, McMahan et al. 2018), and
   adds Gaussian noise of standard deviation z_update x C / m (Flower's `compute_stdv`);
4. C moves towards the median update norm as in Andrew et al. 2021 ("Differentially private learning with
   adaptive clipping"): the fraction of devices whose update was not clipped is released with Gaussian noise of
   standard deviation sigma_b on the centred count (each device adds ±1/2, so the sensitivity is 1/2), and
   C <- C x exp(-eta (fraction - gamma)) with eta = 0.2 and gamma = 0.5.

Accounting. Adding or removing one device changes the sum of clipped updates by at most C and the centred count
by at most 1/2; the two Gaussian releases together are one Gaussian mechanism with noise multiplier z where
z^-2 = z_update^-2 + (2 sigma_b)^-2 (Andrew et al., Theorem 1; Flower's `compute_adaptive_noise_params` derives
z_update from z and sigma_b this way). With Poisson sampling at rate q, R rounds are R steps of the sampled Gaussian
mechanism, and the device-level ε at δ is Opacus' RDP accountant over the history [(z, q, R)] — the standard
DP-FedAvg accounting. It holds for every device in the population, sampled or not, so the ledger charges each of
them. z < 2 sigma_b is required (otherwise no z_update exists); sigma_b defaults to m / 20 as in Andrew et al., so a
noise multiplier z needs more than 10 z devices per round unless `clip_count_stddev` is raised.

What it protects: a device's whole data, against anyone who sees the released model (or any model of the
run). It is central DP: the coordinator sees every device's unclipped update and adds the noise itself, so it
protects nothing against the coordinator. Record-level DP (Opacus on every device) is what protects against
the coordinator.

Why not Flower's `DifferentialPrivacyServerSideAdaptiveClipping` itself: it drives a whole Strategy (clipping
every reply's arrays, errors included) and averages by example count, while the ledger-aware FleetFedAvg must
record failures and refusals first and the sensitivity bound needs equal weights and a fixed denominator; and
Flower 1.41 updates the norm with the *clipped* fraction in the formula Andrew et al. state for the *unclipped*
one (at gamma = 0.5, a norm below most updates shrinks further), with raw 0/1 bits whose sensitivity is 1, not the
1/2 its noise split assumes. So the same building blocks are applied here, with the update rule and the count
as the paper has them.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from flwr.supercore.differential_privacy import (
    adaptive_clip_inputs_inplace,
    compute_adaptive_noise_params,
    compute_stdv,
    get_norm,
)

from server.fl.plan import PlanError, TrainPlan
from server.fl.privacy import History, epsilon_of, noise_for_target

__all__ = [
    "CLIP_NORM_LR",
    "TARGET_UNCLIPPED_QUANTILE",
    "AdaptiveClipping",
    "ClipRound",
    "DeviceAccounting",
    "device_accounting",
    "noise_generator",
    "poisson_sample",
]

CLIP_NORM_LR = 0.2  # eta of Andrew et al. (and Flower's default)
TARGET_UNCLIPPED_QUANTILE = 0.5  # gamma: C tracks the median update norm

_T = TypeVar("_T")


@dataclass(frozen=True)
class DeviceAccounting:
    """The device-level mechanism of one run and its accountant."""

    population: int  # devices that can be sampled (those with budget for the whole run)
    expected_clients: float  # m = q x population: the fixed denominator
    sample_rate: float  # q
    noise_multiplier: float  # z: the whole mechanism's (updates and clipped count), what the accountant charges
    update_noise_multiplier: float  # z_update >= z: the noise on the summed updates, relative to C
    count_stddev: float  # sigma_b: the noise on the centred count of unclipped updates
    delta: float
    rounds: int

    def history(self, rounds_done: int) -> History:
        """Opacus' accountant history after `rounds_done` rounds: one step of the sampled Gaussian per round."""
        return [(self.noise_multiplier, self.sample_rate, rounds_done)] if rounds_done > 0 else []

    def epsilon(self, rounds_done: int) -> float:
        """Device-level ε after `rounds_done` rounds at the run's δ (Opacus' RDP accountant)."""
        return epsilon_of(self.history(rounds_done), self.delta)


def device_accounting(plan: TrainPlan, population: int) -> DeviceAccounting:
    """The mechanism `plan` asks for over `population` devices, or a PlanError saying which combination cannot
    work: too few devices per round for adaptive clipping at this noise, or a target ε no noise meets."""
    if plan.privacy_unit != "device":
        raise PlanError(f"the plan's privacy unit is {plan.privacy_unit!r}, not 'device'")
    if population < 1:
        raise PlanError("device-level DP needs at least one device with privacy budget for the whole run")
    m = min(plan.clients_per_round or population, population)
    q = m / population
    count_stddev = plan.clip_count_stddev if plan.clip_count_stddev is not None else m / 20
    if plan.target_epsilon is not None:
        try:
            z = noise_for_target(plan.target_epsilon, plan.delta, q, plan.rounds)
        except ValueError as e:  # Opacus: "The privacy budget is too low."
            raise PlanError(
                f"target ε {plan.target_epsilon:g} cannot be met at device level with {m} of {population} devices "
                f"per round over {plan.rounds} rounds at δ {plan.delta:g} ({e}); plan a larger ε, fewer rounds or "
                "fewer devices per round"
            ) from e
        if not z < 2 * count_stddev:
            raise PlanError(
                f"target ε {plan.target_epsilon:g} needs noise multiplier {z:.3f} at q = {q:.3g} over "
                f"{plan.rounds} rounds, but adaptive clipping with clipped-count noise sigma_b = {count_stddev:g} can "
                f"carry less than {2 * count_stddev:g} (sigma_b is {m} devices per round / 20 unless set): raise "
                f"--clients-per-round, set --clip-count-stddev above {z / 2:.3f}, or plan a larger ε"
            )
    else:
        assert plan.noise_multiplier is not None  # a device-unit plan is private (TrainPlan checks)
        z = plan.noise_multiplier
        if not z < 2 * count_stddev:
            raise PlanError(
                f"device-level DP at noise multiplier {z:g} with {m} devices per round is too few for adaptive "
                f"clipping: its clipped-count noise sigma_b = {count_stddev:g} ({m} / 20 unless set) must exceed z / 2 "
                f"= {z / 2:g}; use more than {math.floor(10 * z)} devices per round, set --clip-count-stddev above "
                f"{z / 2:g}, or lower the noise multiplier"
            )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, z_update = compute_adaptive_noise_params(z, m, count_stddev)
    return DeviceAccounting(
        population, float(m), q, float(z), float(z_update), float(count_stddev), plan.delta, plan.rounds
    )


def noise_generator(plan: TrainPlan) -> np.random.Generator:
    """The coordinator's generator for device sampling, update noise and count noise: from the operating
    system's entropy, never from the plan (its seed is in the model card: whoever reads the card could replay the
    noise and remove it, and knowing who was sampled undoes the amplification), unless the plan asks for seeded
    noise (lab only; the model card then says it is not private)."""
    if plan.seeded_noise:
        return np.random.default_rng([plan.seed, 0xDE71CE])
    return np.random.default_rng(secrets.randbits(128))


def poisson_sample(population: list[_T], rate: float, rng: np.random.Generator) -> list[_T]:
    """Each member independently with probability `rate` (the sampling the accountant assumes)."""
    if rate >= 1:
        return list(population)
    return [p for p in population if rng.random() < rate]


@dataclass(frozen=True)
class ClipRound:
    """What one round of device-level aggregation did (for logs and tests; not private in itself)."""

    clipping_norm: float  # C used this round
    next_clipping_norm: float  # C after the update rule
    noise_stddev: float  # of the Gaussian noise added to each weight
    devices: int  # updates aggregated
    unclipped: int  # of those, updates with norm <= C


class AdaptiveClipping:
    """DP-FedAvg aggregation with adaptive clipping (see the module docstring); keeps C across rounds."""

    def __init__(self, accounting: DeviceAccounting, rng: np.random.Generator, initial_clipping_norm: float) -> None:
        if not initial_clipping_norm > 0:
            raise ValueError(f"the initial clipping norm must be > 0 (got {initial_clipping_norm})")
        self.accounting = accounting
        self.rng = rng
        self.clipping_norm = float(initial_clipping_norm)

    def aggregate(
        self, current: list[np.ndarray], updates: list[list[np.ndarray]]
    ) -> tuple[list[np.ndarray], ClipRound]:
        """The new global weights from the sampled devices' weights (`updates`, each a list like `current`),
        with noise added whether or not any device answered (an empty round releases noise too)."""
        a, c = self.accounting, self.clipping_norm
        total = [np.zeros(w.shape, dtype=np.float64) for w in current]
        unclipped = 0
        for weights in updates:
            if len(weights) != len(current) or any(w.shape != g.shape for w, g in zip(weights, current, strict=True)):
                raise ValueError("a device's weights do not match the global model's shapes")
            delta = [
                np.asarray(w, dtype=np.float64) - np.asarray(g, dtype=np.float64)
                for w, g in zip(weights, current, strict=True)
            ]
            clipped = get_norm(delta) > 0 and adaptive_clip_inputs_inplace(delta, c)
            unclipped += not clipped
            for t, d in zip(total, delta, strict=True):
                np.add(t, d, out=t)
        stddev = compute_stdv(a.update_noise_multiplier, c, a.expected_clients)  # type: ignore[arg-type]
        new = [
            (np.asarray(g, dtype=np.float64) + t / a.expected_clients + self.rng.normal(0.0, stddev, g.shape)).astype(
                g.dtype
            )
            for g, t in zip(current, total, strict=True)
        ]
        centred = unclipped - len(updates) / 2 + self.rng.normal(0.0, a.count_stddev)
        fraction = centred / a.expected_clients + 0.5
        self.clipping_norm = c * math.exp(-CLIP_NORM_LR * (fraction - TARGET_UNCLIPPED_QUANTILE))
        return new, ClipRound(c, self.clipping_norm, stddev, len(updates), unclipped)
