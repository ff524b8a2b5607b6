"""The privacy ledger and the model registry, both in the coordinator's SQLite database (schema v5).

Ledger: every ε a device reports after a round is stored (cumulative within its run). A device's ε for a run is
its last report in that run; its lifetime ε is the sum over runs (see server/fl/privacy.py for why). Its budget
is its row in privacy_budgets, or the data directory's `epsilon_budget`.

Registry: a model version `name@seq` with its weights, lineage (run, parent, rounds, devices, data schema, ε and
δ, metrics per round, code version) and the drift reference the run computed federatedly. The model card is
generated from the lineage (`model_card`), never typed by hand.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.errors import NotFoundError
from server.store import Store, now_ms

__all__ = ["Ledger", "ModelVersion", "Registry", "TrainingRuns", "model_card", "model_card_markdown"]


class Ledger:
    def __init__(self, store: Store, default_budget: float) -> None:
        self.store = store
        self.default_budget = default_budget

    def budget(self, device_id: str) -> float:
        row = self.store.db.execute("SELECT budget FROM privacy_budgets WHERE device_id = ?", [device_id]).fetchone()
        return float(row[0]) if row else self.default_budget

    def set_budget(self, device_id: str, budget: float) -> None:
        if not budget >= 0:
            raise ValueError(f"a budget must be a number >= 0 (got {budget})")
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO privacy_budgets (device_id, budget) VALUES (?, ?) "
                "ON CONFLICT(device_id) DO UPDATE SET budget = excluded.budget",
                [device_id, budget],
            )

    def lifetime(self, device_id: str, excluding_run: str = "") -> float:
        row = self.store.db.execute(
            """SELECT COALESCE(SUM(eps), 0) FROM (
                 SELECT run_id, epsilon AS eps, MAX(round) FROM privacy_spend
                 WHERE device_id = ? AND run_id != ? GROUP BY run_id)""",
            [device_id, excluding_run],
        ).fetchone()
        return float(row[0])

    def record(self, run_id: str, device_id: str, server_round: int, epsilon: float, delta: float) -> None:
        self.store.db.execute(
            "INSERT OR REPLACE INTO privacy_spend (run_id, device_id, round, epsilon, delta, at) VALUES (?,?,?,?,?,?)",
            [run_id, device_id, server_round, epsilon, delta, now_ms()],
        )

    def rows(self) -> list[dict[str, Any]]:
        """Per device and run: ε and δ of the run, the model version it produced, and the device's lifetime."""
        runs = self.store.db.execute(
            """SELECT p.device_id, p.run_id, p.epsilon, p.delta, MAX(p.round) AS rounds, r.model_version
               FROM privacy_spend p JOIN fl_runs r ON r.id = p.run_id
               GROUP BY p.device_id, p.run_id ORDER BY p.device_id, r.started_at"""
        ).fetchall()
        out: list[dict[str, Any]] = []
        lifetime: dict[str, float] = {}
        for device_id, run_id, eps, delta, rounds, version in runs:
            lifetime[device_id] = lifetime.get(device_id, 0.0) + float(eps)
            out.append(
                {
                    "device": device_id,
                    "run": run_id,
                    "model_version": version or None,
                    "rounds": int(rounds),
                    "epsilon": float(eps),
                    "delta": float(delta),
                    "lifetime_epsilon": lifetime[device_id],
                    "budget": self.budget(device_id),
                }
            )
        return out


class TrainingRuns:
    """fl_runs, fl_rounds and fl_incidents: what a run did, round by round, and what went wrong where."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def start(self, run_id: str, model_name: str, engine: str, plan: dict[str, Any]) -> None:
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO fl_runs (id, model_name, engine, plan, status, started_at) VALUES (?,?,?,?,?,?)",
                [run_id, model_name, engine, json.dumps(plan, sort_keys=True), "running", now_ms()],
            )

    def finish(self, run_id: str, status: str, error: str = "", model_version: str = "") -> None:
        with self.store.transaction() as db:
            db.execute(
                "UPDATE fl_runs SET status = ?, error = ?, model_version = ?, finished_at = ? WHERE id = ?",
                [status, error, model_version, now_ms(), run_id],
            )

    def record_round(self, run_id: str, row: dict[str, Any]) -> None:
        """One fl_rounds row; `row` holds its columns (round, selected, ..., seconds)."""
        cols = ["run_id", *row]
        self.store.db.execute(
            f"INSERT OR REPLACE INTO fl_rounds ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [run_id, *row.values()],
        )

    def incident(self, run_id: str, server_round: int, device_id: str, kind: str, detail: str) -> None:
        self.store.db.execute(
            "INSERT INTO fl_incidents (run_id, round, device_id, kind, detail, at) VALUES (?,?,?,?,?,?)",
            [run_id, server_round, device_id, kind, detail[:2000], now_ms()],
        )

    def run(self, run_id: str) -> dict[str, Any]:
        row = self.store.db.execute("SELECT * FROM fl_runs WHERE id = ?", [run_id]).fetchone()
        if row is None:
            raise NotFoundError(f"no training run {run_id}")
        cols = [d[0] for d in self.store.db.execute("SELECT * FROM fl_runs LIMIT 0").description]
        doc = dict(zip(cols, row, strict=True))
        doc["plan"] = json.loads(doc["plan"])
        return doc

    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        return list(self.store.db.query("SELECT * FROM fl_rounds WHERE run_id = ? ORDER BY round", [run_id]))

    def incidents(self, run_id: str) -> list[dict[str, Any]]:
        return list(self.store.db.query("SELECT * FROM fl_incidents WHERE run_id = ? ORDER BY rowid", [run_id]))

    def list(self) -> list[dict[str, Any]]:
        return list(
            self.store.db.query(
                "SELECT id, model_name, status, model_version, started_at FROM fl_runs ORDER BY started_at"
            )
        )


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
        with self.store.transaction() as db:
            row = db.execute("SELECT COALESCE(MAX(seq), 0) FROM models WHERE name = ?", [name]).fetchone()
            seq = int(row[0]) + 1
            version = f"{name}@{seq}"
            db.execute(
                "INSERT INTO models (version, name, seq, run_id, parent, weights, weights_sha256, lineage, reference,"
                " created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                [
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
                ],
            )
            db.execute(
                "UPDATE fl_runs SET status = 'completed', model_version = ?, finished_at = ? WHERE id = ?",
                [version, now_ms(), run_id],
            )
        return version

    def get(self, version: str) -> ModelVersion:
        row = self.store.db.execute(
            "SELECT version, name, seq, run_id, parent, weights, weights_sha256, lineage, reference, created_at"
            " FROM models WHERE version = ?",
            [version],
        ).fetchone()
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
        row = self.store.db.execute(
            "SELECT version FROM models WHERE name = ? ORDER BY seq DESC LIMIT 1", [name]
        ).fetchone()
        return str(row[0]) if row else None

    def list(self) -> list[dict[str, Any]]:
        rows = self.store.db.query(
            "SELECT version, name, seq, run_id, parent, weights_sha256, lineage, created_at FROM models"
            " ORDER BY created_at, seq"
        )
        out = []
        for r in rows:
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
            "data": lin["data"],
            "code_version": lin["code_version"],
        },
        "privacy": lin["privacy"],
        "metrics": lin["metrics"],
    }


def model_card_markdown(m: ModelVersion) -> str:
    card = model_card(m)
    t, p, met = card["training"], card["privacy"], card["metrics"]
    eps = (
        "not private (no DP)"
        if p["epsilon"] is None
        else f"ε = {p['epsilon']:.3f}, δ = {p['delta']:g} (per device, this run)"
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
