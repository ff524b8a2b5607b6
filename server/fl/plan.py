"""What a training run is asked to do: checked in full before anything starts (no torch or Flower imports)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from server.errors import CoordinatorError

__all__ = ["ACCOUNTANTS", "PlanError", "TrainPlan"]

ACCOUNTANTS = ("rdp", "prv")  # Opacus' RDP and PRV accountants (server/fl/privacy.py uses the same names)


class PlanError(CoordinatorError):
    """A training plan that cannot run."""


@dataclass(frozen=True)
class TrainPlan:
    rounds: int = 20
    clients: int = 10  # devices (virtual clients) in the federation
    clients_per_round: int = 0  # 0: all eligible devices every round
    target_epsilon: float | None = None  # choose the noise so the planned rounds end at or below this
    noise_multiplier: float | None = 1.0  # used when no target ε is given; None with no target: no DP
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    # Opacus' accountant for record-level DP, used alike by the devices (noise for a target ε, the ε they report)
    # and by the coordinator's recomputation: "rdp", or "prv" (tighter: a lower ε for the same noise).
    accountant: str = "rdp"
    local_epochs: int = 2
    batch_size: int = 128
    lr: float = 0.5
    alpha: float = 0.5  # Dirichlet concentration of the non-IID split
    seed: int = 0
    secure_mode: bool = False
    # Lab only: DP noise and Poisson masks seeded from (seed, round, device), so a run repeats. Whoever knows the
    # plan (the coordinator) can then replay the noise and remove it: not private against the coordinator.
    seeded_noise: bool = False
    model_name: str = "digits"
    parent: str = ""  # a registered version to start from; empty: a seeded initialisation
    round_timeout: float = 600.0
    data_label: str = ""  # said in the lineage after the data source, e.g. a rehearsal's sensor fault
    cause: str = ""  # why this run happened, e.g. the drift alarm a retraining answers (lineage, model card)
    # ε (at `delta`) of the drift reference's two count queries together, charged to each device that answers
    # them (server/fl/private_counts.py says how they are noised and composed).
    reference_epsilon: float = 0.5
    # Lab only: devices that allow it (their node config, or a simulation's own devices) answer the drift
    # reference's queries with exact counts, charged nothing and private against nobody; the model card says so.
    # On a handful of devices the private reference's noise drowns the drift it is meant to show.
    exact_reference: bool = False
    # "record": DP-SGD on every device protects one example (Opacus, noise added on the device). "device": the
    # coordinator clips whole-device updates adaptively and noises their sum, protecting a device's whole data
    # against whoever sees the model, not against the coordinator (server/fl/device_dp.py).
    privacy_unit: str = "record"
    device_clip_norm: float = 0.1  # device unit: the initial clipping norm C of whole-device updates (adapts)
    clip_count_stddev: float | None = None  # device unit: sd of the clipped-count noise; None: devices per round / 20

    @property
    def private(self) -> bool:
        return self.target_epsilon is not None or self.noise_multiplier is not None

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.rounds <= 1000:
            problems.append(f"rounds must be 1..1000 (got {self.rounds})")
        if not 1 <= self.clients <= 10_000:
            problems.append(f"clients must be 1..10000 (got {self.clients})")
        if not 0 <= self.clients_per_round <= self.clients:
            problems.append(f"clients per round must be 0..{self.clients} (got {self.clients_per_round})")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            problems.append(f"target ε must be > 0 (got {self.target_epsilon})")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            problems.append(f"noise multiplier must be > 0 (got {self.noise_multiplier})")
        if not 0 < self.delta < 1:
            problems.append(f"δ must lie in (0, 1) (got {self.delta})")
        if not self.max_grad_norm > 0:
            problems.append(f"max grad norm must be > 0 (got {self.max_grad_norm})")
        if not 1 <= self.local_epochs <= 100 or not 1 <= self.batch_size <= 4096 or not 0 < self.lr <= 10:
            problems.append("local epochs 1..100, batch size 1..4096 and 0 < lr <= 10")
        if self.accountant not in ACCOUNTANTS:
            problems.append(f"accountant must be one of {', '.join(ACCOUNTANTS)} (got {self.accountant!r})")
        elif self.accountant != "rdp" and self.privacy_unit == "device":
            problems.append(f"the {self.accountant} accountant is for the record privacy unit (device: rdp)")
        if not self.alpha > 0:
            problems.append(f"alpha must be > 0 (got {self.alpha})")
        if self.privacy_unit not in ("record", "device"):
            problems.append(f"privacy unit must be 'record' or 'device' (got {self.privacy_unit!r})")
        elif self.privacy_unit == "device":
            if not self.private:
                problems.append("the device privacy unit needs a noise multiplier or a target ε (it is DP)")
            if self.secure_mode:
                problems.append("secure mode is Opacus' generator on devices: record-level DP only")
            if not self.device_clip_norm > 0:
                problems.append(f"device clip norm must be > 0 (got {self.device_clip_norm})")
            if self.clip_count_stddev is not None and not self.clip_count_stddev > 0:
                problems.append(f"clip count stddev must be > 0 (got {self.clip_count_stddev})")
        if not (isinstance(self.reference_epsilon, int | float) and 0 < self.reference_epsilon <= 100):
            problems.append(f"reference ε must be in (0, 100] (got {self.reference_epsilon})")
        if problems:
            raise PlanError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> TrainPlan:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(doc) - known
        if unknown:
            raise PlanError(f"unknown plan setting(s): {', '.join(sorted(unknown))}")
        return cls(**doc)
