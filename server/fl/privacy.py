"""Differential privacy on a client: Opacus DP-SGD for one round, and accounting that spans rounds and runs.

Accounting rules (stated once, used by client and coordinator alike):
- Within a run, a client's accountant history — (noise multiplier, sample rate, steps) entries — is kept in the
  device's own privacy record (`DeviceBudget`: fsync'd, atomically replaced) and restored before every round, so
  the ε it reports is cumulative over the run's rounds (the run's accountant over the whole history), not the
  ε of the last round alone, even after a SuperNode or agent restart lost its Flower context. A device never
  reports or records a lower ε for a run than it did before.
- The accountant is the run's (`TrainPlan.accountant`): Opacus' RDP accountant by default, or its PRV accountant
  (numerical composition of privacy loss random variables, Gopi et al. 2021), which gives a tighter (lower) ε
  for the same noise, so a target ε needs less noise. The client calibrates its noise and reports its ε with it,
  and the coordinator recomputes with the same one.
- The coordinator does not take a client's word for it: `check_epsilon` recomputes the ε from the plan and the
  noise, sample rate and steps the client reports, with the same accountant, and the ledger keeps the larger
  figure; a mismatch is an incident. Nothing lowers an ε once recorded.
- Across runs, ε adds up (basic sequential composition): a device's lifetime ε is the sum of the final ε of each
  run it took part in. This is an upper bound; it never under-counts.
- δ is fixed per run and adds up across runs too: k runs at (ε_i, δ_i) compose to (Σ ε_i, Σ δ_i), so the
  lifetime δ is the sum of the runs' δ (the ledger shows it beside the lifetime ε).
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as privacy_analysis
from opacus.accountants.analysis.prv import (
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    discretize,
)
from opacus.accountants.utils import get_noise_multiplier

from edge_agent.contract.files import atomic_write_bytes
from server.errors import CoordinatorError
from server.fl.model import DigitsNet, LocalResult, _batches_loss, get_weights, set_weights
from server.fl.plan import ACCOUNTANTS  # the accountants a run may use (`TrainPlan.accountant`)

__all__ = [
    "ACCOUNTANTS",
    "BudgetExceeded",
    "DeviceBudget",
    "EpsilonCheck",
    "History",
    "RunAccount",
    "check_epsilon",
    "epsilon_of",
    "noise_for_target",
    "steps_per_round",
    "train_private",
]

History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps), Opacus' accountant history


class BudgetExceeded(CoordinatorError):
    """Taking part would push a device past its lifetime privacy budget."""


def epsilon_of(history: History, delta: float, accountant: str = "rdp") -> float:
    """ε after the given accountant history at δ (0 for an empty history) under `accountant` ("rdp" or "prv"),
    computed exactly as Opacus' `RDPAccountant` / `PRVAccountant` compute it (for PRV: its default ε and δ
    errors, and the upper bound), with the one-step RDP vector cached per (noise, sample rate): the series behind
    it costs about a quarter of a second, and every round of every device would otherwise pay it again (the PRV
    accountant needs it too, to size its discretisation domain)."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(_unknown_accountant(accountant))
    if not history:
        return 0.0
    if accountant == "prv":
        return _prv_epsilon(tuple((float(z), float(q), int(n)) for z, q, n in history), float(delta))
    return _rdp_epsilon(_history_rdp(history), delta)


def _unknown_accountant(accountant: object) -> str:
    return f"the accountant must be one of {', '.join(ACCOUNTANTS)} (got {accountant!r})"


def _history_rdp(history: Sequence[tuple[float, float, int]]) -> np.ndarray:
    """The RDP of a history at each default order: the sum over entries of steps x one step's RDP."""
    total = np.zeros(len(RDPAccountant.DEFAULT_ALPHAS))
    for z, q, n in history:
        total = total + _one_step_rdp(float(z), float(q)) * int(n)
    return total


def _rdp_epsilon(rdp: np.ndarray, delta: float) -> float:
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": a higher order could give a tighter bound; this one is still a
        # valid upper bound on ε, and it is what Opacus reports for the same history.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        eps, _ = privacy_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


PRV_EPS_ERROR = 0.01  # Opacus' PRVAccountant.get_epsilon defaults: ε error 0.01, δ error δ / 1000


@functools.lru_cache(maxsize=1024)
def _prv_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Opacus' `PRVAccountant.get_epsilon(delta)` for this history, step for step: the discretisation domain sized
    as its `compute_safe_domain_size` does (from RDP bounds, here from the cached one-step vectors), the truncated
    PRVs discretised on it and composed, and the upper bound of the resulting ε."""
    eps_error, delta_error = PRV_EPS_ERROR, delta / 1000
    total = sum(n for _, _, n in history)
    size = _rdp_epsilon(_history_rdp(history), delta_error / 4)
    for z, q, _ in history:
        size = max(size, _rdp_epsilon(_one_step_rdp(z, q), delta_error / (8 * total)))
    size = max(size, eps_error) + 3
    domain = Domain.create_aligned(-size, size, eps_error / np.sqrt(total * np.log(12 / delta_error) / 2))
    with np.errstate(divide="ignore"):  # at sample rate 1 Opacus' PRV takes log(1 - q) = -inf, as it should
        discrete = [
            discretize(
                TruncatedPrivacyRandomVariable(PoissonSubsampledGaussianPRV(q, z), domain.t_min, domain.t_max), domain
            )
            for z, q, _ in history
        ]
        composed = compose_heterogeneous(dprvs=discrete, num_self_compositions=[n for _, _, n in history])
        _, _, upper = composed.compute_epsilon(delta, delta_error, eps_error)
    return float(upper)


@dataclass(frozen=True)
class EpsilonCheck:
    """The coordinator's check of one client's ε after a round.

    `recomputed` is the ε of `charged` — the history the client reported, moved to the safe side of what the plan
    implies (no noise above the plan's, no sample rate below it, no fewer steps than the rounds it trained) — at
    the plan's δ. `recorded` is the largest of the reported, the recomputed and the previously recorded ε: what
    the ledger keeps. `problems` says, one sentence each, where the client's report and the plan disagree;
    `history_usable` is false when the client sent no accountant history the coordinator could read (then its
    ε is charged from the plan alone).
    """

    reported: float
    recomputed: float
    recorded: float
    charged: History
    problems: tuple[str, ...]
    history_usable: bool

    @property
    def mismatch(self) -> bool:
        return bool(self.problems)


def check_epsilon(
    reported: float | None,
    history: History | None,
    *,
    delta: float,
    sample_rate: float,
    min_steps: int,
    max_noise: float,
    previous: float = 0.0,
    accountant: str = "rdp",
) -> EpsilonCheck:
    """Recompute a client's run ε from what it reports (`history`: its noise multipliers, sample rates and steps;
    None when unreadable) and what the plan implies for it (`sample_rate` from its example count and the batch
    size, `min_steps` for the rounds it trained, `max_noise`: the plan's noise multiplier or the one its target ε
    gives), with the accountant the client runs (the run's: "rdp" or "prv")."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(_unknown_accountant(accountant))
    problems: list[str] = []
    claimed = reported if reported is not None and math.isfinite(reported) and reported >= 0 else None
    if claimed is None:
        problems.append(f"reported ε {reported!r} is not a number >= 0")
    entries = history or []
    usable = bool(entries) and all(
        math.isfinite(z) and z > 0 and math.isfinite(q) and 0 < q <= 1 and n > 0 for z, q, n in entries
    )
    if not usable:
        problems.append("reported no usable accountant history (noise multiplier, sample rate, steps)")
        entries = []
    charged: History = []
    for z, q, n in entries:
        if z > max_noise * (1 + 1e-9):
            problems.append(f"reported noise multiplier {z:.6g}, above the plan's {max_noise:.6g}")
        if q < sample_rate * (1 - 1e-9):
            problems.append(f"reported sample rate {q:.6g}, below the {sample_rate:.6g} its data and batch imply")
        charged.append((min(z, max_noise), max(q, sample_rate), n))
    steps = sum(n for _, _, n in charged)
    if steps < min_steps:
        if usable:
            problems.append(f"reported {steps} steps, fewer than the {min_steps} of the rounds it trained")
        charged.append((max_noise, sample_rate, min_steps - steps))
    recomputed = epsilon_of(charged, delta, accountant)
    if claimed is not None and usable:
        implied = epsilon_of(entries, delta, accountant)
        if not math.isclose(claimed, implied, rel_tol=1e-6, abs_tol=1e-9):
            relation = "below" if claimed < implied else "above"
            problems.append(f"reported ε {claimed:.6g}, {relation} the {implied:.6g} its own history implies")
    recorded = max(recomputed, previous, claimed or 0.0)
    return EpsilonCheck(
        math.nan if claimed is None else claimed, recomputed, recorded, charged, tuple(problems), usable
    )


@functools.lru_cache(maxsize=4096)
def _one_step_rdp(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    rdp: np.ndarray = privacy_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    return rdp


def steps_per_round(examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(sample rate, optimizer steps per round) as Opacus' Poisson loader makes them: with L = ceil(n / batch)
    batches per epoch, each example joins a batch with probability 1/L, and a round takes epochs x L steps."""
    batches = math.ceil(examples / min(batch_size, examples))
    return 1.0 / batches, epochs * batches


@functools.lru_cache(maxsize=1024)
def noise_for_target(
    target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str = "rdp"
) -> float:
    """The noise multiplier that makes `total_steps` at `sample_rate` end at or below `target_epsilon` under
    `accountant` (Opacus' own search; under PRV it takes some seconds per sample rate, hence the cache)."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(_unknown_accountant(accountant))
    if accountant == "rdp" and target_epsilon <= _rdp_epsilon_floor(delta):
        # No noise gets below what δ alone costs; Opacus' search would double the noise up to its cap first, an
        # RDP evaluation each (a minute), and then say so.
        raise ValueError("The privacy budget is too low.")
    with warnings.catch_warnings(), np.errstate(divide="ignore"):  # log(1 - q) at q = 1 under PRV: see above
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=total_steps,
                accountant=accountant,
                epsilon_tolerance=0.01,
            )
        )


def _rdp_epsilon_floor(delta: float) -> float:
    """The ε Opacus' RDP accountant gives at δ as the noise grows without bound (every order's RDP at 0): any
    finite noise gives more, so a target at or below it is met by none."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    with warnings.catch_warnings():  # at RDP 0 the largest order is the best: that is the limit asked for
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        floor, _ = privacy_analysis.get_privacy_spent(orders=orders, rdp=[0.0] * len(orders), delta=delta)
    return float(floor)


def train_private(
    weights: list[np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    history: History,
    seed: int,
    secure_mode: bool = False,
    accountant: str = "rdp",
) -> tuple[LocalResult, History]:
    """One round of DP-SGD (per-sample clipping at `max_grad_norm`, Gaussian noise, Poisson sampling).

    The accountant (`accountant`: "rdp" or "prv"; both keep the same history of noise multipliers, sample
    rates and steps) starts from `history` and the returned history includes this round's steps. With
    `secure_mode` Opacus draws noise and batches from a cryptographically secure generator (then `seed` cannot
    make a run repeatable, by design).
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(_unknown_accountant(accountant))
    torch.manual_seed(seed)
    model = DigitsNet()
    set_weights(model, weights)
    data = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader = torch.utils.data.DataLoader(data, batch_size=min(batch_size, len(x)))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    with warnings.catch_warnings():
        # Opacus warns that secure_mode=False is not for production; the caller chose it (see the CLI's help), and
        # the noise's seed comes from the device's own entropy unless a lab plan asked otherwise.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*secure_mode.*")
        engine = PrivacyEngine(accountant=accountant, secure_mode=secure_mode)
        engine.accountant.history = list(history)
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
        )
        loss, steps = 0.0, 0
        for _ in range(epochs):
            epoch_loss, epoch_steps = _batches_loss(private_model, private_optimizer, private_loader)
            loss, steps = loss + epoch_loss, steps + epoch_steps
    new_history: History = [(float(z), float(q), int(n)) for z, q, n in engine.accountant.history]
    return LocalResult(get_weights(private_model), loss / max(epochs, 1), len(x), steps), new_history


@dataclass
class DeviceBudget:
    """A device's own record of the privacy it has spent, kept on the device (it need not trust the coordinator).

    `spent` maps run id -> ε of that run so far; the lifetime is their sum. `runs` keeps, per run, the accountant
    history (noise multiplier, sample rate, steps), the run's δ and the noise the device chose, so a device that
    lost its Flower context (a SuperNode or agent restart) restores the history and goes on counting.

    Invariants: a run's ε and its history only grow (a lower figure or a shorter history is ignored, never
    written over a higher one); every write is a temporary file in the same directory, fsync'd, renamed over the
    record, and the directory fsync'd, so a crash leaves the old record or the new one, whole.
    """

    path: Path
    budget: float
    spent: dict[str, float]
    runs: dict[str, RunAccount] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, budget: float) -> DeviceBudget:
        spent: dict[str, float] = {}
        runs: dict[str, RunAccount] = {}
        if path.exists():
            try:
                doc = json.loads(path.read_text())
                spent = {str(k): _epsilon(v) for k, v in doc.get("spent", {}).items()}
                runs = {str(k): RunAccount.from_json(v) for k, v in doc.get("runs", {}).items()}
            except (OSError, ValueError, AttributeError, TypeError, KeyError) as e:
                raise CoordinatorError(f"device privacy record {path} is unreadable ({e}); refusing to train") from e
        return cls(path, budget, spent, runs)

    def lifetime(self, excluding_run: str = "") -> float:
        return sum(v for k, v in self.spent.items() if k != excluding_run)

    def run_epsilon(self, run_id: str) -> float:
        """The highest ε this device has recorded for the run (0 before its first round)."""
        return self.spent.get(run_id, 0.0)

    def history(self, run_id: str) -> History:
        """The run's accountant history as last recorded (empty before its first round)."""
        account = self.runs.get(run_id)
        return list(account.history) if account else []

    def noise(self, run_id: str) -> float | None:
        """The noise multiplier this device chose for the run, once it has trained in it."""
        account = self.runs.get(run_id)
        return account.noise if account else None

    def check(self, run_id: str, run_epsilon_after: float) -> None:
        """Raise BudgetExceeded when this run reaching `run_epsilon_after` would pass the lifetime budget."""
        total = self.lifetime(excluding_run=run_id) + max(run_epsilon_after, self.run_epsilon(run_id))
        if total > self.budget + 1e-9:
            raise BudgetExceeded(
                f"lifetime ε would reach {total:.3f}, over this device's budget {self.budget:.3f} "
                f"(spent before this run {self.lifetime(excluding_run=run_id):.3f})"
            )

    def record(
        self,
        run_id: str,
        run_epsilon: float,
        history: History | None = None,
        delta: float | None = None,
        noise: float | None = None,
    ) -> float:
        """Record the run's ε (and its accountant history) durably; returns the run's ε as recorded, which is
        never lower than before: a lower ε, or a history with fewer steps, leaves the earlier figure in place."""
        recorded = max(_epsilon(run_epsilon), self.run_epsilon(run_id))
        self.spent[run_id] = recorded
        if history is not None and delta is not None and noise is not None:
            old = self.runs.get(run_id)
            if old is None or _steps(history) >= _steps(old.history):
                self.runs[run_id] = RunAccount(list(history), delta, noise)
        doc = {
            "budget": self.budget,
            "spent": self.spent,
            "runs": {k: v.to_json() for k, v in self.runs.items()},
        }
        atomic_write_bytes(self.path, json.dumps(doc, sort_keys=True).encode())  # fsync'd, then renamed
        return recorded


@dataclass(frozen=True)
class RunAccount:
    """One run's accounting on a device: its accountant history, δ and the noise multiplier it chose."""

    history: History
    delta: float
    noise: float

    def to_json(self) -> dict[str, object]:
        return {"history": [list(h) for h in self.history], "delta": self.delta, "noise": self.noise}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RunAccount:
        history: History = [(float(z), float(q), int(n)) for z, q, n in doc["history"]]
        return cls(history, float(doc["delta"]), float(doc["noise"]))


def _epsilon(value: object) -> float:
    eps = float(value)  # type: ignore[arg-type]
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"an ε must be a finite number >= 0 (got {value!r})")
    return eps


def _steps(history: History) -> int:
    return sum(n for _, _, n in history)
