"""The privacy ledger and the model registry, both in the coordinator's SQLite database (schema v5, v9, v10).

Ledger: a device's ε after each round is stored (cumulative within its run): the larger of what it reported and
what the coordinator recomputed from its noise, sample rate and steps, and never below the run's earlier ε. A
device's ε for a run is the highest recorded in it. What it spends on queries besides training (the drift
reference's noised counts, purpose "drift-reference") is stored per query, cumulative per purpose in the run.
Its lifetime ε is the sum over runs and purposes, and so is its lifetime δ (see server/fl/privacy.py for why).
Its budget is its row in privacy_budgets, or the data directory's `epsilon_budget`.

Registry: a model version `name@seq` with its weights, lineage (run, parent, rounds, devices, data schema, ε and
δ, metrics per round, code version) and the drift reference the run computed federatedly. The model card is
generated from the lineage (`model_card`), never typed by hand.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.errors import NotFoundError
from server.store import Store, now_ms
from server.store.consent import ConsentRecords
from server.store.training import LedgerRecords, ModelRecords, RunRecords

__all__ = [
    "QUERY_PURPOSES",
    "Ledger",
    "ModelVersion",
    "Registry",
    "TrainingRuns",
    "model_card",
    "model_card_markdown",
]

# What a device's privacy is spent on besides training, as the ledger names it on each row.
QUERY_PURPOSES = ("drift-reference",)


class Ledger:
    def __init__(self, store: Store, default_budget: float) -> None:
        self.store = store
        self.default_budget = default_budget

    def budget(self, device_id: str) -> float:
        own = LedgerRecords(self.store).budget(device_id)
        return self.default_budget if own is None else own

    def set_budget(self, device_id: str, budget: float) -> None:
        if not budget >= 0:
            raise ValueError(f"a budget must be a number >= 0 (got {budget})")
        LedgerRecords(self.store).set_budget(device_id, budget)

    def lifetime(self, device_id: str, excluding_run: str = "") -> float:
        return LedgerRecords(self.store).lifetime(device_id, excluding_run)

    def record(
        self,
        run_id: str,
        device_id: str,
        server_round: int,
        epsilon: float,
        delta: float,
        reported: float | None = None,
        recomputed: float | None = None,
        mismatch: bool = False,
    ) -> float:
        """Record the device's run ε after a round (with what it reported and what the coordinator recomputed);
        returns it as recorded, never below the run's earlier ε. An ε that is not a finite number >= 0, or a δ
        outside (0, 1), is refused and nothing is written."""
        if not (math.isfinite(epsilon) and epsilon >= 0):
            raise ValueError(f"an ε must be a finite number >= 0 (got {epsilon!r}); nothing was recorded")
        if not 0 < delta < 1:
            raise ValueError(f"a δ must lie in (0, 1) (got {delta!r}); nothing was recorded")
        if reported is not None and not math.isfinite(reported):
            reported = None  # an unreadable report is stored as none
        return LedgerRecords(self.store).record(
            run_id, device_id, server_round, epsilon, delta, now_ms(), reported, recomputed, mismatch
        )

    def record_query(
        self,
        run_id: str,
        device_id: str,
        purpose: str,
        step: int,
        query: str,
        epsilon: float,
        delta: float,
        *,
        noise_multiplier: float,
        sensitivity: float,
        reported: float | None = None,
    ) -> float:
        """Record what a device spent answering a query for `purpose` (one of QUERY_PURPOSES) in a run: its ε for
        the purpose after its `step`th query (cumulative), at δ, with the query's noise multiplier and L2
        sensitivity and what the device reported; returns the ε as recorded, never below the purpose's earlier ε
        in the run. Anything malformed is refused and nothing is written."""
        problems = []
        if purpose not in QUERY_PURPOSES:
            problems.append(f"unknown purpose {purpose!r} (known: {', '.join(QUERY_PURPOSES)})")
        if not (math.isfinite(epsilon) and epsilon >= 0):
            problems.append(f"an ε must be a finite number >= 0 (got {epsilon!r})")
        if not 0 < delta < 1:
            problems.append(f"a δ must lie in (0, 1) (got {delta!r})")
        if not step >= 1 or not query:
            problems.append(f"a query needs a name and a step >= 1 (got {query!r}, {step!r})")
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0 and math.isfinite(sensitivity)):
            problems.append(f"noise multiplier {noise_multiplier!r} and sensitivity {sensitivity!r} must be numbers")
        if problems:
            raise ValueError("; ".join(problems) + "; nothing was recorded")
        if reported is not None and not math.isfinite(reported):
            reported = None
        return LedgerRecords(self.store).record_query(
            run_id, device_id, purpose, step, query, epsilon, delta, noise_multiplier, sensitivity, reported, now_ms()
        )

    def queries(self, run_id: str) -> list[dict[str, Any]]:
        """A run's query spends (drift reference), one row per device, purpose and query."""
        return LedgerRecords(self.store).queries(run_id)

    def run_epsilon(self, run_id: str, device_id: str) -> float:
        """The device's ε in the run as recorded so far (0: none)."""
        return LedgerRecords(self.store).run_epsilon(run_id, device_id)

    def devices(self, run_id: str) -> set[str]:
        """The devices that reported ε in a run."""
        return set(LedgerRecords(self.store).devices(run_id))

    def rows(self) -> list[dict[str, Any]]:
        """Per device, run and purpose ("training", or a query purpose such as "drift-reference", whose `rounds`
        counts the queries answered; a run's training row first). Per row: the privacy unit (`record`: one
        example; `device`: the device's whole data), the accountant behind its ε (`rdp` or `prv`), ε and δ, the
        model version the run produced, how many times the client's report disagreed with the coordinator's
        recomputation, and the device's lifetime ε and δ so far (each the sum over its runs and purposes: basic
        composition). The lifetime sums both units: a device-level (ε, δ) also bounds any one record of the
        device, so the sum is a record-level bound; a device-level lifetime exists only over device-unit runs.
        `consented`: whether the device had consented to training when the run greeted it (None: a run from before
        consent was recorded)."""
        records = LedgerRecords(self.store)
        consent = ConsentRecords(self.store).by_run()
        spends: list[tuple[Any, ...]] = [
            (device_id, run_id, "training", eps, delta, rounds, version, mismatches, unit, accountant)
            for device_id, run_id, eps, delta, rounds, version, mismatches, unit, accountant in records.by_run()
        ]
        # Query purposes (the drift reference): one row per device, run and purpose, its unit one record, its two
        # queries composed with RDP (server/fl/private_counts.py).
        spends += [(d, r, p, e, dl, n, v, 0, "record", "rdp") for d, r, p, e, dl, n, v in records.queries_by_run()]
        order = {run["id"]: i for i, run in enumerate(RunRecords(self.store).all())}
        spends.sort(key=lambda s: (s[0], order.get(s[1], len(order)), s[2] != "training", s[2]))
        out: list[dict[str, Any]] = []
        lifetime: dict[str, tuple[float, float]] = {}
        for device_id, run_id, purpose, eps, delta, rounds, version, mismatches, unit, accountant in spends:
            spent_eps, spent_delta = lifetime.get(device_id, (0.0, 0.0))
            lifetime[device_id] = (spent_eps + float(eps), spent_delta + float(delta))
            out.append(
                {
                    "device": device_id,
                    "run": run_id,
                    "purpose": purpose,
                    "unit": unit,
                    "accountant": accountant,
                    "model_version": version or None,
                    "rounds": int(rounds),
                    "epsilon": float(eps),
                    "delta": float(delta),
                    "epsilon_mismatches": int(mismatches),
                    "lifetime_epsilon": lifetime[device_id][0],
                    "lifetime_delta": lifetime[device_id][1],
                    "budget": self.budget(device_id),
                    "consented": consent.get((run_id, device_id)),
                }
            )
        return out


class TrainingRuns:
    """fl_runs, fl_rounds and fl_incidents: what a run did, round by round, and what went wrong where."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def start(self, run_id: str, model_name: str, engine: str, plan: dict[str, Any]) -> None:
        RunRecords(self.store).insert(run_id, model_name, engine, json.dumps(plan, sort_keys=True), "running", now_ms())

    def finish(self, run_id: str, status: str, error: str = "", model_version: str = "") -> None:
        RunRecords(self.store).finish(run_id, status, error, model_version, now_ms())

    def record_round(self, run_id: str, row: dict[str, Any]) -> None:
        """One fl_rounds row; `row` holds its columns (round, selected, ..., seconds)."""
        RunRecords(self.store).record_round(run_id, row)

    def incident(self, run_id: str, server_round: int, device_id: str, kind: str, detail: str) -> None:
        RunRecords(self.store).add_incident(run_id, server_round, device_id, kind, detail[:2000], now_ms())

    def run(self, run_id: str) -> dict[str, Any]:
        doc = RunRecords(self.store).get(run_id)
        if doc is None:
            raise NotFoundError(f"no training run {run_id}")
        doc["plan"] = json.loads(doc["plan"])
        return doc

    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        return RunRecords(self.store).rounds(run_id)

    def incidents(self, run_id: str) -> list[dict[str, Any]]:
        return RunRecords(self.store).incidents(run_id)

    def list(self) -> list[dict[str, Any]]:
        return RunRecords(self.store).all()


def weights_to_bytes(weights: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, *weights)
    return buf.getvalue()


def weights_from_bytes(data: bytes) -> list[np.ndarray]:
    with np.load(io.BytesIO(data)) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def weights_digest(weights: list[np.ndarray]) -> str:
    """SHA-256 over the arrays' shapes and bytes: equal weights, equal digest (npz containers are not compared)."""
    h = hashlib.sha256()
    for w in weights:
        a = np.ascontiguousarray(w, dtype=np.float32)
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ModelVersion:
    version: str
    name: str
    seq: int
    run_id: str
    parent: str
    weights: list[np.ndarray]
    weights_sha256: str
    lineage: dict[str, Any]
    reference: dict[str, Any]
    created_at: int


class Registry:
    def __init__(self, store: Store) -> None:
        self.store = store

    def register(
        self,
        name: str,
        run_id: str,
        parent: str,
        weights: list[np.ndarray],
        lineage: dict[str, Any],
        reference: dict[str, Any],
    ) -> str:
        """Store a new version `name@seq` (seq one above the name's last) and mark the run completed."""
        models = ModelRecords(self.store)
        with self.store.transaction():
            seq = models.last_seq(name) + 1
            version = f"{name}@{seq}"
            models.insert(
                version,
                name,
                seq,
                run_id,
                parent,
                weights_to_bytes(weights),
                weights_digest(weights),
                json.dumps(lineage, sort_keys=True),
                json.dumps(reference, sort_keys=True),
                now_ms(),
            )
            RunRecords(self.store).completed(run_id, version, now_ms())
        return version

    def get(self, version: str) -> ModelVersion:
        row = ModelRecords(self.store).get(version)
        if row is None:
            known = ", ".join(m["version"] for m in self.list()[-5:]) or "none yet; run `fedfleet train`"
            raise NotFoundError(f"no model version {version!r} (latest: {known})")
        v, name, seq, run_id, parent, blob, sha, lineage, reference, created = row
        return ModelVersion(
            v,
            name,
            int(seq),
            run_id,
            parent,
            weights_from_bytes(blob),
            sha,
            json.loads(lineage),
            json.loads(reference),
            int(created),
        )

    def latest(self, name: str) -> str | None:
        return ModelRecords(self.store).latest(name)

    def list(self) -> list[dict[str, Any]]:
        out = []
        for r in ModelRecords(self.store).all():
            lineage = json.loads(r.pop("lineage"))
            out.append({**r, "epsilon": lineage["privacy"]["epsilon"], "accuracy": lineage["metrics"]["test_accuracy"]})
        return out


def model_card(m: ModelVersion) -> dict[str, Any]:
    """The model card as JSON, from the registry's lineage: what the release carries and the policy checks."""
    lin = m.lineage
    return {
        "model": {"name": m.name, "version": m.version, "weights_sha256": m.weights_sha256},
        "intended_use": lin.get("intended_use", "handwritten digit classification (8x8 grey images) on fleet devices"),
        "training": {
            "run_id": m.run_id,
            "parent": m.parent or None,
            "cause": lin.get("cause") or None,
            "engine": lin["engine"],
            "rounds": lin["rounds"],
            "clients_per_round": lin["clients_per_round"],
            "participating_devices": lin["devices"],
            "consent": lin.get("consent"),  # the devices that consented to the run (None: a run from before)
            "data": lin["data"],
            "code_version": lin["code_version"],
        },
        "privacy": lin["privacy"],
        "metrics": lin["metrics"],
    }


def model_card_markdown(m: ModelVersion) -> str:
    card = model_card(m)
    t, p, met = card["training"], card["privacy"], card["metrics"]
    unit = p.get("unit") or "record"
    eps = (
        "not private (no DP)"
        if p["epsilon"] is None
        else f"ε = {p['epsilon']:.3f}, δ = {p['delta']:g} (per device, this run), privacy unit: {unit}"
        + (f" — protects {p['protects']}" if p.get("protects") else "")
    )
    lines = [
        f"# Model card: {m.version}",
        "",
        f"**Intended use.** {card['intended_use']}",
        "",
        "## Training",
        f"- Federated run `{t['run_id']}` ({t['engine']} engine), {t['rounds']} rounds, "
        f"{t['clients_per_round']} clients per round",
        f"- {len(t['participating_devices'])} participating devices; data: {t['data']['source']}",
        *(
            [
                f"- Consent to training: {len(t['consent']['devices'])} device(s) consented "
                f"({', '.join(t['consent']['devices']) or 'none'}); "
                f"{len(t['consent']['without_consent'])} left out without consent"
                + ("; the policy requires recorded consent" if t["consent"]["required"] else "")
            ]
            if t["consent"]
            else []
        ),
        f"- Parent version: {t['parent'] or 'none (trained from a seeded initialisation)'}; code {t['code_version']}",
        *([f"- Why: {t['cause']}"] if t["cause"] else []),
        "",
        "## Privacy",
        f"- {eps}; accountant: {p.get('accountant', '-')}, noise multiplier {p.get('noise_multiplier_range', '-')}, "
        f"max grad norm {p.get('max_grad_norm', '-')}",
        "",
        "## Metrics (held-out test split, coordinator side)",
        f"- accuracy {met['test_accuracy']:.4f}, loss {met['test_loss']:.4f}",
        "",
        "| round | accuracy | loss | ε (max over clients) |",
        "| --- | --- | --- | --- |",
    ]
    for r in met["per_round"]:
        e = "-" if r["epsilon_max"] is None else f"{r['epsilon_max']:.3f}"
        lines.append(f"| {r['round']} | {r['test_accuracy']:.4f} | {r['test_loss']:.4f} | {e} |")
    return "\n".join(lines) + "\n"
