"""Differential privacy on a client: Opacus DP-SGD for one round, and accounting that spans rounds and runs.

Accounting rules (stated once, used by client and coordinator alike):
- Within a run, a client's accountant history — (noise multiplier, sample rate, steps) entries — is kept in its
  Flower context state and restored before every round, so the ε it reports is cumulative over the run's rounds
  (Opacus' RDP accountant over the whole history), not the ε of the last round alone.
- Across runs, ε adds up (basic sequential composition): a device's lifetime ε is the sum of the final ε of each
  run it took part in. This is an upper bound; it never under-counts.
- δ is fixed per run; runs with different δ still add their ε (the ledger shows δ per run).
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as privacy_analysis
from opacus.accountants.utils import get_noise_multiplier

from server.errors import CoordinatorError
from server.fl.model import DigitsNet, LocalResult, _batches_loss, get_weights, set_weights

__all__ = [
    "BudgetExceeded",
    "DeviceBudget",
    "History",
    "epsilon_of",
    "noise_for_target",
    "steps_per_round",
    "train_private",
]

History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps), Opacus' accountant history


class BudgetExceeded(CoordinatorError):
    """Taking part would push a device past its lifetime privacy budget."""


def epsilon_of(history: History, delta: float) -> float:
    """ε after the given accountant history at δ (0 for an empty history), computed exactly as Opacus' RDP
    accountant does — the sum over entries of steps x (one step's RDP at each default order), then the
    conversion to (ε, δ) — with the one-step RDP vector cached per (noise, sample rate): the series behind it
    costs about a quarter of a second, and every round of every device would otherwise pay it again."""
    if not history:
        return 0.0
    rdp = sum([_one_step_rdp(float(z), float(q)) * int(n) for z, q, n in history])
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": a higher order could give a tighter bound; this one is still a
        # valid upper bound on ε, and it is what Opacus reports for the same history.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        eps, _ = privacy_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


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
def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, total_steps: int) -> float:
    """The noise multiplier that makes `total_steps` at `sample_rate` end at or below `target_epsilon`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=total_steps,
                accountant="rdp",
                epsilon_tolerance=0.01,
            )
        )


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
) -> tuple[LocalResult, History]:
    """One round of DP-SGD (per-sample clipping at `max_grad_norm`, Gaussian noise, Poisson sampling).

    The accountant starts from `history` and the returned history includes this round's steps. With
    `secure_mode` Opacus draws noise and batches from a cryptographically secure generator (then `seed` cannot
    make a run repeatable, by design).
    """
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
        engine = PrivacyEngine(accountant="rdp", secure_mode=secure_mode)
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

    `spent` maps run id -> ε of that run so far; the lifetime is their sum. Written atomically.
    """

    path: Path
    budget: float
    spent: dict[str, float]

    @classmethod
    def open(cls, path: Path, budget: float) -> DeviceBudget:
        spent: dict[str, float] = {}
        if path.exists():
            try:
                doc = json.loads(path.read_text())
                spent = {str(k): float(v) for k, v in doc.get("spent", {}).items()}
            except (OSError, ValueError, AttributeError) as e:
                raise CoordinatorError(f"device privacy record {path} is unreadable ({e}); refusing to train") from e
        return cls(path, budget, spent)

    def lifetime(self, excluding_run: str = "") -> float:
        return sum(v for k, v in self.spent.items() if k != excluding_run)

    def check(self, run_id: str, run_epsilon_after: float) -> None:
        """Raise BudgetExceeded when this run reaching `run_epsilon_after` would pass the lifetime budget."""
        total = self.lifetime(excluding_run=run_id) + run_epsilon_after
        if total > self.budget + 1e-9:
            raise BudgetExceeded(
                f"lifetime ε would reach {total:.3f}, over this device's budget {self.budget:.3f} "
                f"(spent before this run {self.lifetime(excluding_run=run_id):.3f})"
            )

    def record(self, run_id: str, run_epsilon: float) -> None:
        self.spent[run_id] = run_epsilon
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"budget": self.budget, "spent": self.spent}, sort_keys=True))
        os.replace(tmp, self.path)
