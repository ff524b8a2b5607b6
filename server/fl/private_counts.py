"""The Gaussian mechanism for the bin counts a device contributes to a release's drift reference.

A release's drift reference is built from two queries each device answers once per run (server_app's
`_reference`): `feature-histogram` (per feature, counts over a fine uniform grid; the coordinator derives
quantile edges from the pooled grid) and `reference-counts` (per feature, counts over those edges, and the final
model's top-class score over fixed edges). Without noise the per-device counts say exactly what the device's data
holds, so both are noised on the device before they leave it.

Sensitivity (stated once). The unit is one record (one example) on one device, added or removed — the
neighbouring relation of the training's Opacus accountant (Poisson sampling), so the spends add up in one ledger.
A query's answer is H histograms laid side by side (64 for `feature-histogram`; 64 + 1 for `reference-counts`,
the score's histogram included). Every histogram's bins partition the line (the outer bins are open-ended), so a
record's value lands in exactly one bin of each histogram (a NaN in none). Adding or removing one record
therefore changes H counts by exactly 1 each and no other count: the L2 sensitivity is √H (8 for 64 features,
√65 for the reference counts). For a replace-one relation it would be √(2H); add/remove is what the ledger uses.

Mechanism. Each count gets independent N(0, (z·√H)²) noise; z (the noise multiplier) is the same for both
queries. The Gaussian mechanism with noise multiplier z has Rényi DP a / (2 z²) at every order a (Opacus'
`compute_rdp` with sample rate 1 gives exactly that), and RDP adds across queries, so the two queries together
are one RDP accountant with two steps: `noise_multiplier` picks z so that both end at or below the plan's
`reference_epsilon` at its δ (Opacus' own `get_noise_multiplier`, RDP accountant, sample rate 1, 2 steps), and
`epsilon_after(z, δ, k)` is the ε after the first k queries. A device charges ε after the first query, then the
ε of both after the second: its drift-reference spend in a run is cumulative like its training ε, and adds to
its lifetime by basic composition (the ledger sums a run's training ε and its drift-reference ε, and their δ).

Pooling and clipping. A device returns its noised counts as they are (negative values included: clipping each
device's counts would bias every bin upwards by about 0.4 sigma per device). The coordinator adds the devices'
counts and clips the pooled counts at 0 — post-processing, which costs no privacy. Noise comes from a
generator seeded from the device's own entropy (`os.urandom`), like its training noise; nothing the coordinator
knows replays it. The generator is numpy's PCG64, not a cryptographic one, and the normal samples are
floating-point (the known attacks on floating-point noise are not addressed), as in Opacus' default mode.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as privacy_analysis
from opacus.accountants.utils import get_noise_multiplier

__all__ = [
    "PURPOSE",
    "REFERENCE_QUERIES",
    "epsilon_after",
    "epsilon_of_answers",
    "l2_sensitivity",
    "noise_multiplier",
    "noised_counts",
    "pooled_counts",
    "private_generator",
]

PURPOSE = "drift-reference"  # the privacy ledger's name for what these queries spend
REFERENCE_QUERIES = ("feature-histogram", "reference-counts")  # in the order a run asks them


def l2_sensitivity(histograms: int) -> float:
    """The L2 sensitivity of `histograms` histograms of the same records to adding or removing one record: one
    count changes by 1 in each histogram, so √histograms."""
    if histograms < 1:
        raise ValueError(f"a query counts at least one histogram (got {histograms})")
    return math.sqrt(histograms)


def noise_multiplier(epsilon: float, delta: float, queries: int = len(REFERENCE_QUERIES)) -> float:
    """The noise multiplier z that makes `queries` Gaussian-mechanism answers at noise z·sensitivity end at or
    below (epsilon, delta), by Opacus' RDP accountant (sample rate 1: every record is in every answer)."""
    _check(epsilon, delta, queries)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=1.0,
                steps=queries,
                accountant="rdp",
                epsilon_tolerance=0.005,
            )
        )


def epsilon_after(noise: float, delta: float, queries: int) -> float:
    """ε at δ after `queries` answers at noise multiplier `noise` (0 before the first)."""
    return epsilon_of_answers([(noise, 1.0, queries)] if queries else [], delta)


def epsilon_of_answers(answers: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε at δ after the answers a device gave, as (noise multiplier, 1.0, how many) entries: their RDP adds."""
    if not answers:
        return 0.0
    for z, _, n in answers:
        if not (math.isfinite(z) and z > 0) or n < 1:
            raise ValueError(f"an answer needs a noise multiplier > 0 and a count >= 1 (got {z!r}, {n!r})")
    _check(1.0, delta, 1)
    rdp = sum(
        [
            privacy_analysis.compute_rdp(q=1.0, noise_multiplier=z, steps=n, orders=RDPAccountant.DEFAULT_ALPHAS)
            for z, _, n in answers
        ]
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        eps, _ = privacy_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def private_generator() -> np.random.Generator:
    """A generator seeded from this device's own entropy: what its drift-reference noise is drawn from."""
    return np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(32), "big")))


def noised_counts(
    counts: Sequence[np.ndarray], noise: float, rng: np.random.Generator
) -> tuple[list[np.ndarray], float]:
    """The Gaussian mechanism over one query's answer: `counts` are its histograms (each array's rows, or a 1-D
    array as one), all of the same records; every count gets N(0, sigma²) with sigma = noise · √(histograms).
    Returns the noised counts (float64, not clipped) and sigma."""
    if not (math.isfinite(noise) and noise > 0):
        raise ValueError(f"a noise multiplier must be a finite number > 0 (got {noise!r})")
    histograms = sum(1 if np.ndim(c) == 1 else int(np.shape(c)[0]) for c in counts)
    sigma = noise * l2_sensitivity(histograms)
    out = [np.asarray(c, dtype=np.float64) + rng.normal(0.0, sigma, np.shape(c)) for c in counts]
    return out, sigma


def pooled_counts(answers: Sequence[np.ndarray]) -> np.ndarray:
    """The devices' noised counts added up and clipped at 0 (post-processing of the noised answers)."""
    if not answers:
        raise ValueError("no answers to pool")
    total = np.sum([np.asarray(a, dtype=np.float64) for a in answers], axis=0)
    clipped: np.ndarray = np.maximum(total, 0.0)
    return clipped


def _check(epsilon: float, delta: float, queries: int) -> None:
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"a drift-reference ε must be a finite number > 0 (got {epsilon!r})")
    if not 0 < delta < 1:
        raise ValueError(f"a δ must lie in (0, 1) (got {delta!r})")
    if queries < 1:
        raise ValueError(f"at least one query (got {queries})")
