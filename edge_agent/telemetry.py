"""Telemetry windows: recording them on the device (their wire form is the contract's: contract/windows.py).

A window belongs to exactly one release: a model swap closes the current window, so the old release's
statistics never mix with the new one's. A window also closes after `every_inferences` inferences or
`every_seconds` seconds, whichever comes first.

Data quality: when the release carries an input schema with valid ranges (edge_agent/contract/schema.py), every
input is checked against it as it is folded into the window, and the window counts the inputs checked, the
non-finite ones and the ones out of range. Nothing is refused here: the input was already served.

Differential privacy (`WindowPrivacy`, agent.toml [telemetry] dp_epsilon_per_window): each window is noised
(edge_agent.contract.windows.noised, the Laplace mechanism for ε on everything it publishes) with a generator
seeded from the OS's entropy, after its ε is charged to the device's monitoring budget (edge_agent.state,
written before the window leaves). So that neither when a window closes nor whether it is sent depends on the
inferences, a noised window closes on time only (`every_seconds`; a model swap or a stop closes it too) and is
sent even when empty. When what is left of the budget is less than one window's ε, the last noised window says
so (`monitoring_budget_exhausted`) and windows stop; if the device finds its budget spent without having said
so (a restart with a lower budget), it sends one empty window that only says so. Raising the budget resumes them.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.contract.drift import DriftReference, WindowCounts, WindowNoise
from edge_agent.contract.schema import InputSchema
from edge_agent.contract.windows import ClosedWindow, noised
from edge_agent.state import MonitoringBudget

__all__ = ["TelemetryRecorder", "WindowPrivacy"]

logger = logging.getLogger(__name__)

_BATCH = 1024  # inferences kept before they are folded into the window's counts


def _os_seeded() -> np.random.Generator:
    """A generator seeded from the OS's entropy (128 bits): nothing the coordinator knows can replay it."""
    return np.random.default_rng(secrets.randbits(128))


@dataclass
class WindowPrivacy:
    """Noise on every window for `epsilon`, charged to `budget`."""

    epsilon: float
    budget: MonitoringBudget
    rng: np.random.Generator = field(default_factory=_os_seeded)

    def release(self, counts: WindowCounts, reference: DriftReference) -> WindowCounts | None:
        """The counts to send for a closed window: noised once its ε is written down; an empty window saying the
        budget is spent, once; else None (nothing leaves the device)."""
        charge = self.budget.charge(self.epsilon)
        if charge is not None:
            if charge.exhausted:
                logger.warning(
                    "monitoring budget spent (ε %.4g of %.4g): this is the last noised telemetry window until "
                    "[telemetry] monitoring_budget_epsilon is raised",
                    charge.spent,
                    charge.budget,
                )
            return noised(counts, self.epsilon, self.rng, charge.spent, charge.budget, charge.exhausted)
        if not self.budget.say_exhausted():
            return None
        spent, budget = self.budget.spent, self.budget.budget
        logger.warning("monitoring budget spent (ε %.4g of %.4g): no telemetry windows", spent, budget)
        marker = WindowCounts.empty(reference)
        marker.noise = WindowNoise(0.0, 0.0, spent, budget, exhausted=True)
        return marker


class TelemetryRecorder:
    """Accumulates inferences into windows; thread-safe (applications may infer from several threads).

    Every method takes `lock` (re-entrant) itself except `record_one`, the per-inference call, whose caller holds
    it: the agent holds it for the whole inference anyway, to serialize the interpreter and keep a model swap
    from splitting an inference from its record, so a second lock per inference would only cost time.

    With `privacy`, windows are noised and close on time only (module docstring): `every_inferences` then only
    bounds how many inferences wait to be folded into the counts."""

    def __init__(
        self,
        on_close: Callable[[ClosedWindow], None],
        every_inferences: int = 500,
        every_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
        privacy: WindowPrivacy | None = None,
    ) -> None:
        if every_inferences < 1 or every_seconds <= 0:
            raise ValueError("a window needs at least one inference and a positive duration")
        self._on_close = on_close
        self.every_inferences = every_inferences
        self.every_seconds = every_seconds
        self._clock = clock
        self._privacy = privacy
        self.lock = threading.RLock()
        self._release: str | None = None  # none before the first switch: no record_one matches
        self._reference: DriftReference | None = None
        self._schema: InputSchema | None = None
        self._counts: WindowCounts | None = None
        self._start = 0.0
        # Inferences not yet folded into the counts, each input and output as the bytes of its array (tobytes is
        # the cheapest copy numpy has: a sixth of np.array), with the dtype and byte size they were recorded with.
        self._xs: list[bytes] = []
        self._ps: list[bytes] = []
        self._latencies: list[float] = []
        self._layout: tuple[np.dtype[Any], int, np.dtype[Any], int] | None = None
        self._fold_at = _BATCH  # fold when this many are pending (fewer when the window is nearly full)

    def switch(self, release_id: str, reference: DriftReference, schema: InputSchema | None = None) -> None:
        """A new model is active: close the old release's window, start counting for the new one (and checking
        its inputs against `schema`, when the release has one)."""
        with self.lock:
            self._close_locked()
            self._release, self._reference, self._schema = release_id, reference, schema
            self._counts, self._start = WindowCounts.empty(reference), self._clock()
            self._fold_at = min(_BATCH, self.every_inferences)

    def record_one(self, release_id: str, x: np.ndarray, y: np.ndarray, latency_ms: float) -> None:
        """Account for one inference; the caller holds `lock`. Its input and output are copied (the caller may
        reuse its arrays) and folded into the counts with others in batches, so an inference costs two small
        copies here."""
        if release_id != self._release:
            return  # not the current release's (the agent's serving lock makes this not happen)
        xb, yb = x.tobytes(), y.tobytes()
        layout = (x.dtype, len(xb), y.dtype, len(yb))
        if layout != self._layout:
            self._flush_locked()
            self._layout = layout
        self._xs.append(xb)
        self._ps.append(yb)
        self._latencies.append(latency_ms)
        if len(self._latencies) >= self._fold_at:
            self._flush_locked()
            if self._full_locked():
                self._close_locked()

    def record(
        self,
        release_id: str,
        inputs: np.ndarray,
        probabilities: np.ndarray,
        latencies_ms: Sequence[float],
        errors: int = 0,
    ) -> None:
        """Account for a batch of inferences: inputs (n, n_features), probabilities (n, n_classes)."""
        with self.lock:
            if release_id != self._release or self._counts is None or self._reference is None:
                return
            self._flush_locked()
            self._counts.add(self._reference, inputs, probabilities, latencies_ms)
            batch = np.asarray(inputs)
            self._check_locked(batch.reshape(len(batch), -1))
            self._counts.errors += errors
            if self._full_locked():
                self._close_locked()

    def record_error(self) -> None:
        with self.lock:
            if self._counts is not None:
                self._counts.errors += 1

    def due(self) -> bool:
        """Whether tick() would close the window now (a cheap check, no lock)."""
        return self._counts is not None and self._clock() - self._start >= self.every_seconds

    def seconds_until_due(self) -> float:
        """How long until the open window's time is up (a full window's time when none is open)."""
        if self._counts is None:
            return self.every_seconds
        return max(0.0, min(self.every_seconds, self._start + self.every_seconds - self._clock()))

    def tick(self) -> None:
        """Close the window if its time is up (called periodically)."""
        with self.lock:
            if self.due():
                self._close_locked()

    def close(self) -> None:
        """Close the open window now (a graceful stop: its counts go to the outbox instead of being lost)."""
        with self.lock:
            self._close_locked()

    def _full_locked(self) -> bool:
        """Whether the window closes for its inference count (never a noised one: its end would tell the count)."""
        return self._privacy is None and self._counts is not None and self._counts.inferences >= self.every_inferences

    def _flush_locked(self) -> None:
        n = len(self._latencies)
        xs, ps, latencies = self._xs, self._ps, self._latencies
        self._xs, self._ps, self._latencies = [], [], []
        if n and self._counts is not None and self._reference is not None and self._layout is not None:
            x_dtype, x_size, p_dtype, p_size = self._layout
            x = np.frombuffer(b"".join(xs), x_dtype).reshape(n, x_size // x_dtype.itemsize)
            p = np.frombuffer(b"".join(ps), p_dtype).reshape(n, p_size // p_dtype.itemsize)
            self._counts.add(self._reference, x, p, np.array(latencies))
            self._check_locked(x)
        if self._counts is not None:
            left = _BATCH if self._privacy is not None else self.every_inferences - self._counts.inferences
            self._fold_at = max(1, min(_BATCH, left))

    def _check_locked(self, x: np.ndarray) -> None:
        """Count the batch's inputs that break the release's input schema (none checked without one)."""
        if self._schema is None or self._counts is None or not len(x):
            return
        nonfinite, out_of_range = self._schema.violations(x)
        self._counts.inputs_checked += len(x)
        self._counts.inputs_nonfinite += nonfinite
        self._counts.inputs_out_of_range += out_of_range

    def _close_locked(self) -> None:
        if self._counts is None or self._reference is None or self._release is None:
            return
        self._flush_locked()
        if self._privacy is not None:
            now = self._clock()
            released = self._privacy.release(self._counts, self._reference)
            if released is not None:
                self._on_close(ClosedWindow(self._release, int(self._start * 1000), int(now * 1000), released))
        elif self._counts.inferences or self._counts.errors:
            now = self._clock()
            self._on_close(ClosedWindow(self._release, int(self._start * 1000), int(now * 1000), self._counts))
        self._counts, self._start = WindowCounts.empty(self._reference), self._clock()
        self._fold_at = min(_BATCH, self.every_inferences)
