"""The agent's durable state: A/B model slots, the highest assignment counter seen, a pending update, and the
newest freshness statement the director signed for this device.

Layout under the state directory:

    state.json          this record, replaced atomically (never half-written)
    monitoring.json     ε spent on noised telemetry windows (MonitoringBudget), replaced atomically
    slots/a/model.tflite, slots/b/model.tflite
    downloads/          partial downloads, named by sha256, resumed after a restart
    tuf/                python-tuf's verified metadata cache

Invariant: the active slot's file is never written. An update writes the inactive slot and then flips
`active` in one atomic replace of state.json, so a process killed at any instant restarts on a committed model.

Freshness only moves forward: a statement replaces the held one only if it was issued later and names a counter
no lower (`fresh_issued_ms`, `fresh_counter` never decrease), so a replayed old statement changes nothing.
`update` is serialized by a lock: the update thread and the agent's loop (freshness checks) both write.

The monitoring budget only moves one way: a window's ε is written to monitoring.json (fsync'd) before the window
is released, and never if it would take the spend past the budget; a crash between the two loses a window, never
an ε. The spend is kept as an exact fraction, so no rounding lets many small spends creep past the budget.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edge_agent.contract.files import atomic_write_bytes, remove_stale_temp_files
from edge_agent.contract.reasons import Reason
from edge_agent.errors import AgentError

if TYPE_CHECKING:
    from fractions import Fraction  # imported where used: only a device with [telemetry] noise counts ε

__all__ = ["AgentState", "MonitoringBudget", "MonitoringCharge", "SlotInfo", "StateStore"]

Slot = Literal["a", "b"]


@dataclass(frozen=True)
class SlotInfo:
    target_path: str
    sha256: str
    length: int
    release_id: str
    counter: int
    custom: dict[str, Any] = field(default_factory=dict)  # the release's signed custom metadata (probe, schema)


@dataclass(frozen=True)
class AgentState:
    active: Slot | None = None
    slots: dict[str, SlotInfo] = field(default_factory=dict)
    highest_counter: int = 0  # highest assignment counter accepted; lower ones are replays
    committed_counter: int = 0
    pending: str | None = None  # hex of the SignedAssignment being applied, for resume after a crash
    last_error: str = ""
    last_reason: str = ""
    fresh_counter: int = 0  # the counter of the newest verified freshness statement: lower assignments are superseded
    fresh_issued_ms: int = 0  # when that statement was issued (a statement issued earlier is not newer)
    fresh_until_ms: int = 0  # when it expires; past it (or with none) the device is stale
    stale: bool = False  # the device said it was stale (an event once per change, also across restarts)

    def is_stale(self, now_ms: int) -> bool:
        return now_ms >= self.fresh_until_ms

    @property
    def inactive(self) -> Slot:
        return "b" if self.active == "a" else "a"

    @property
    def active_info(self) -> SlotInfo | None:
        return self.slots.get(self.active) if self.active else None

    def to_json(self) -> dict[str, Any]:
        # Field by field rather than dataclasses.asdict, which deep-copies each slot's custom metadata (probe
        # set, drift reference): a third of the cost of every state write.
        return {
            **{f.name: getattr(self, f.name) for f in fields(self)},
            "slots": {k: {f.name: getattr(v, f.name) for f in fields(v)} for k, v in self.slots.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentState:
        slots = {k: SlotInfo(**v) for k, v in data.get("slots", {}).items()}
        return cls(**{**data, "slots": slots})


class StateStore:
    """state.json and the directories beside it. An instance keeps the state it last read or wrote: the agent that
    owns the directory is state.json's only writer, so its reads (a status for every update step) need not touch
    the disk; any other reader (`fedfleet-agent status`) makes its own instance and reads the file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "state.json"
        self.downloads = root / "downloads"
        self.tuf_dir = root / "tuf"
        self.director_keys_path = root / "director_keys.json"  # newer than the bundle's, learned through TUF
        for d in (root, self.downloads, self.tuf_dir, self.slot_dir("a"), self.slot_dir("b")):
            d.mkdir(parents=True, exist_ok=True)
        self._state: AgentState | None = None
        self._lock = threading.Lock()

    def remove_stale_temp_files(self) -> int:
        """Delete the temp files a killed writer left behind. Only the agent that owns this state calls it, at
        its start: to any other reader (`fedfleet-agent status`) a temp file may be the live agent's write in
        progress, and removing it would fail that write."""
        return sum(remove_stale_temp_files(d) for d in (self.root, self.slot_dir("a"), self.slot_dir("b")))

    def seed_trust_root(self, trust_root: Path) -> None:
        """Install the enrollment bundle's root.json as the first trusted TUF root, once; rotations advance it."""
        cached = self.tuf_dir / "root.json"
        if not cached.exists():
            if not trust_root.is_file():
                raise AgentError(
                    f"trust root {trust_root} not found; it comes with the enrollment bundle", Reason.TRUST_INVALID
                )
            atomic_write_bytes(cached, trust_root.read_bytes())

    def slot_dir(self, slot: str) -> Path:
        return self.root / "slots" / slot

    def model_path(self, slot: str) -> Path:
        return self.slot_dir(slot) / "model.tflite"

    def load(self) -> AgentState:
        if self._state is None:
            self._state = self._read()
        return self._state

    def _read(self) -> AgentState:
        if not self.path.exists():
            return AgentState()
        try:
            return AgentState.from_json(json.loads(self.path.read_text()))
        except (ValueError, TypeError) as e:
            raise AgentError(
                f"agent state {self.path} is unreadable; restore it or start from an empty state dir"
            ) from e

    def save(self, state: AgentState) -> AgentState:
        # Compact: json.dumps with an indent runs its pure-Python encoder, several times slower than the C one.
        atomic_write_bytes(self.path, json.dumps(state.to_json(), sort_keys=True).encode())
        self._state = state
        return state

    def update(self, **changes: Any) -> AgentState:
        with self._lock:
            return self.save(replace(self.load(), **changes))

    def update_if(self, condition: Callable[[AgentState], bool], **changes: Any) -> AgentState | None:
        """Apply `changes` only if `condition` holds for the current state, checked under the writers' lock;
        returns the new state, or None if nothing changed."""
        with self._lock:
            state = self.load()
            return self.save(replace(state, **changes)) if condition(state) else None


@dataclass(frozen=True)
class MonitoringCharge:
    """A window's ε, written down: the spend after it, and whether what is left affords another such window."""

    spent: float
    budget: float
    exhausted: bool


def _decimal(epsilon: float) -> Fraction:
    """ε as the decimal a person wrote (0.1 is 1/10, not the binary float nearest it), so that budget ÷ ε windows
    fit in the budget as the docs promise."""
    from fractions import Fraction

    return Fraction(repr(float(epsilon)))


class MonitoringBudget:
    """monitoring.json under the state directory: the device's lifetime ε spent on noised telemetry windows.

    `budget` is the owner's (agent.toml); raising it lets windows resume, lowering it below the spend stops them.
    Thread-safe: the recorder charges from whichever thread closes a window."""

    def __init__(self, path: Path, budget: float) -> None:
        if not budget > 0:
            raise ValueError("a monitoring budget must be positive")
        from fractions import Fraction  # with decimal, 0.35 MB that a device without a budget does not keep

        self.path = path
        self.budget = budget
        self._lock = threading.Lock()
        self._spent, self._windows, self._said = Fraction(0), 0, False
        if path.exists():
            try:
                doc = json.loads(path.read_text())
                self._spent = Fraction(doc["spent_exact"])
                self._windows, self._said = int(doc["windows"]), bool(doc["exhausted_said"])
            except (ValueError, TypeError, KeyError, ZeroDivisionError) as e:
                raise AgentError(
                    f"monitoring budget {path} is unreadable; restore it (deleting it would forget the ε spent)",
                    Reason.CONFIG_INVALID,
                ) from e

    @property
    def spent(self) -> float:
        return float(self._spent)

    @property
    def windows(self) -> int:
        return self._windows

    def remaining(self) -> float:
        left = _decimal(self.budget) - self._spent
        return float(left) if left > 0 else 0.0

    def affords(self, epsilon: float) -> bool:
        """Whether what is left pays for one more window of `epsilon`, as `charge` decides it; writes nothing."""
        return self._spent + _decimal(epsilon) <= _decimal(self.budget)

    def charge(self, epsilon: float) -> MonitoringCharge | None:
        """Write one window's ε down (durably) if the budget affords it; None, changing nothing, if not."""
        with self._lock:
            after = self._spent + _decimal(epsilon)
            if after > _decimal(self.budget):
                return None
            exhausted = after + _decimal(epsilon) > _decimal(self.budget)
            self._save(after, self._windows + 1, exhausted)
            return MonitoringCharge(float(after), self.budget, exhausted)

    def say_exhausted(self) -> bool:
        """Whether the device still has to say that its budget is spent (once, until a charge succeeds again);
        noted durably as said when it returns True."""
        with self._lock:
            if self._said:
                return False
            self._save(self._spent, self._windows, True)
            return True

    def _save(self, spent: Fraction, windows: int, said: bool) -> None:
        doc = {
            "spent_epsilon": float(spent),  # for people; spent_exact is what counts
            "spent_exact": str(spent),
            "windows": windows,
            "exhausted_said": said,
            "budget_epsilon": self.budget,
        }
        atomic_write_bytes(self.path, json.dumps(doc, sort_keys=True).encode())
        self._spent, self._windows, self._said = spent, windows, said
