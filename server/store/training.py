"""Federated training's records: runs, their rounds and incidents, the privacy ledger and the model registry.
`server.fl` trains, accounts and registers; this module reads and writes. Writes join the caller's transaction
(`Store.transaction` nests), so a model version and its run's completion commit together.
"""

from __future__ import annotations

from typing import Any

from server.store import Store

__all__ = ["LedgerRecords", "ModelRecords", "RunRecords"]


class RunRecords:
    """fl_runs, fl_rounds and fl_incidents."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def insert(self, run_id: str, model_name: str, engine: str, plan: str, status: str, started_at: int) -> None:
        """A new run, its plan as JSON."""
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO fl_runs (id, model_name, engine, plan, status, started_at) VALUES (?,?,?,?,?,?)",
                [run_id, model_name, engine, plan, status, started_at],
            )

    def finish(self, run_id: str, status: str, error: str, model_version: str, finished_at: int) -> None:
        with self.store.transaction() as db:
            db.execute(
                "UPDATE fl_runs SET status = ?, error = ?, model_version = ?, finished_at = ? WHERE id = ?",
                [status, error, model_version, finished_at, run_id],
            )

    def completed(self, run_id: str, model_version: str, finished_at: int) -> None:
        """The run produced `model_version` (its error, if any, stays)."""
        self.store.db.execute(
            "UPDATE fl_runs SET status = 'completed', model_version = ?, finished_at = ? WHERE id = ?",
            [model_version, finished_at, run_id],
        )

    def get(self, run_id: str) -> dict[str, Any] | None:
        """The run's row, its plan still JSON text; None when there is no such run."""
        row = self.store.db.execute("SELECT * FROM fl_runs WHERE id = ?", [run_id]).fetchone()
        if row is None:
            return None
        cols = [d[0] for d in self.store.db.execute("SELECT * FROM fl_runs LIMIT 0").description]
        return dict(zip(cols, row, strict=True))

    def all(self) -> list[dict[str, Any]]:
        """Every run (id, model, status, version, start), oldest first."""
        return list(
            self.store.db.query(
                "SELECT id, model_name, status, model_version, started_at FROM fl_runs ORDER BY started_at"
            )
        )

    def record_round(self, run_id: str, row: dict[str, Any]) -> None:
        """One fl_rounds row (replacing one of the same round); `row` holds its columns (round, ..., seconds)."""
        cols = ["run_id", *row]
        self.store.db.execute(
            f"INSERT OR REPLACE INTO fl_rounds ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [run_id, *row.values()],
        )

    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        return list(self.store.db.query("SELECT * FROM fl_rounds WHERE run_id = ? ORDER BY round", [run_id]))

    def add_incident(self, run_id: str, server_round: int, device_id: str, kind: str, detail: str, at: int) -> None:
        self.store.db.execute(
            "INSERT INTO fl_incidents (run_id, round, device_id, kind, detail, at) VALUES (?,?,?,?,?,?)",
            [run_id, server_round, device_id, kind, detail, at],
        )

    def incidents(self, run_id: str) -> list[dict[str, Any]]:
        return list(self.store.db.query("SELECT * FROM fl_incidents WHERE run_id = ? ORDER BY rowid", [run_id]))


class LedgerRecords:
    """privacy_spend (each device's ε after each round, cumulative in its run: the larger of what it reported and
    what the coordinator recomputed, never lower than before), privacy_query_spend (what other purposes, such as
    the drift reference's count queries, spent: cumulative per purpose in a run) and privacy_budgets."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def budget(self, device_id: str) -> float | None:
        """The device's own budget; None: it has none (the data directory's default applies)."""
        row = self.store.db.execute("SELECT budget FROM privacy_budgets WHERE device_id = ?", [device_id]).fetchone()
        return float(row[0]) if row else None

    def set_budget(self, device_id: str, budget: float) -> None:
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO privacy_budgets (device_id, budget) VALUES (?, ?) "
                "ON CONFLICT(device_id) DO UPDATE SET budget = excluded.budget",
                [device_id, budget],
            )

    def record(
        self,
        run_id: str,
        device_id: str,
        server_round: int,
        epsilon: float,
        delta: float,
        at: int,
        reported: float | None = None,
        recomputed: float | None = None,
        mismatch: bool = False,
    ) -> float:
        """Store the device's ε for the run after this round, never below an ε already recorded for the run (a
        lower figure is raised to it; the schema's triggers refuse one anyway), with what the client reported,
        what the coordinator recomputed and whether they disagreed; returns the ε as recorded."""
        with self.store.transaction() as db:
            db.execute(
                """INSERT INTO privacy_spend (run_id, device_id, round, epsilon, delta, at, reported_epsilon,
                                             recomputed_epsilon, mismatch)
                   VALUES (?, ?, ?, MAX(?, COALESCE(
                     (SELECT MAX(epsilon) FROM privacy_spend WHERE run_id = ? AND device_id = ?), 0)), ?, ?, ?, ?, ?)
                   ON CONFLICT (run_id, device_id, round)
                   DO UPDATE SET epsilon = MAX(epsilon, excluded.epsilon), delta = excluded.delta, at = excluded.at,
                     reported_epsilon = excluded.reported_epsilon, recomputed_epsilon = excluded.recomputed_epsilon,
                     mismatch = MAX(mismatch, excluded.mismatch)""",
                [
                    run_id,
                    device_id,
                    server_round,
                    epsilon,
                    run_id,
                    device_id,
                    delta,
                    at,
                    reported,
                    recomputed,
                    int(mismatch),
                ],
            )
            row = db.execute(
                "SELECT epsilon FROM privacy_spend WHERE run_id = ? AND device_id = ? AND round = ?",
                [run_id, device_id, server_round],
            ).fetchone()
        return float(row[0])

    def run_epsilon(self, run_id: str, device_id: str) -> float:
        """The highest ε recorded for the device in the run (0: none)."""
        row = self.store.db.execute(
            "SELECT COALESCE(MAX(epsilon), 0) FROM privacy_spend WHERE run_id = ? AND device_id = ?",
            [run_id, device_id],
        ).fetchone()
        return float(row[0])

    def lifetime(self, device_id: str, excluding_run: str = "") -> float:
        """The sum over the device's runs (but one) of its highest training ε in each and its highest ε of each
        other purpose (privacy_query_spend) in each."""
        row = self.store.db.execute(
            """SELECT COALESCE(SUM(eps), 0) FROM (
                 SELECT MAX(epsilon) AS eps FROM privacy_spend
                 WHERE device_id = ? AND run_id != ? GROUP BY run_id
                 UNION ALL
                 SELECT MAX(epsilon) AS eps FROM privacy_query_spend
                 WHERE device_id = ? AND run_id != ? GROUP BY run_id, purpose)""",
            [device_id, excluding_run, device_id, excluding_run],
        ).fetchone()
        return float(row[0])

    def record_query(
        self,
        run_id: str,
        device_id: str,
        purpose: str,
        step: int,
        query: str,
        epsilon: float,
        delta: float,
        noise_multiplier: float,
        sensitivity: float,
        reported: float | None,
        at: int,
    ) -> float:
        """Store the device's ε for the purpose in the run after its `step`th query, never below an ε already
        recorded for the purpose in the run; returns the ε as recorded."""
        with self.store.transaction() as db:
            db.execute(
                """INSERT INTO privacy_query_spend (run_id, device_id, purpose, step, query, epsilon, delta,
                                                   noise_multiplier, sensitivity, reported_epsilon, at)
                   VALUES (?, ?, ?, ?, ?, MAX(?, COALESCE((SELECT MAX(epsilon) FROM privacy_query_spend
                           WHERE run_id = ? AND device_id = ? AND purpose = ?), 0)), ?, ?, ?, ?, ?)
                   ON CONFLICT (run_id, device_id, purpose, step)
                   DO UPDATE SET epsilon = MAX(epsilon, excluded.epsilon), at = excluded.at""",
                [
                    run_id,
                    device_id,
                    purpose,
                    step,
                    query,
                    epsilon,
                    run_id,
                    device_id,
                    purpose,
                    delta,
                    noise_multiplier,
                    sensitivity,
                    reported,
                    at,
                ],
            )
            row = db.execute(
                "SELECT epsilon FROM privacy_query_spend"
                " WHERE run_id = ? AND device_id = ? AND purpose = ? AND step = ?",
                [run_id, device_id, purpose, step],
            ).fetchone()
        return float(row[0])

    def queries(self, run_id: str) -> list[dict[str, Any]]:
        """A run's query spends, one row per device, purpose and query, in the order they were answered."""
        return list(
            self.store.db.query(
                "SELECT * FROM privacy_query_spend WHERE run_id = ? ORDER BY device_id, purpose, step", [run_id]
            )
        )

    def queries_by_run(self) -> list[tuple[Any, ...]]:
        """Per device, run and purpose, in the order the runs started: (device, run, purpose, ε, δ, queries, model
        version), ε and δ the highest recorded."""
        rows = self.store.db.execute(
            """SELECT q.device_id, q.run_id, q.purpose, MAX(q.epsilon), MAX(q.delta), COUNT(*), r.model_version
               FROM privacy_query_spend q JOIN fl_runs r ON r.id = q.run_id
               GROUP BY q.device_id, q.run_id, q.purpose ORDER BY q.device_id, r.started_at, q.purpose"""
        ).fetchall()
        return [tuple(r) for r in rows]

    def by_run(self) -> list[tuple[Any, ...]]:
        """Per device and run, in the order the runs started: (device, run, ε, δ, rounds, model version, ε
        mismatches, privacy unit, accountant), ε and δ the highest recorded in the run, mismatches the rounds in
        which the client's report and the coordinator's recomputation disagreed, the unit and the accountant the
        run's plan names ('record' and 'rdp' for plans from before either existed)."""
        rows = self.store.db.execute(
            """SELECT p.device_id, p.run_id, MAX(p.epsilon), MAX(p.delta), MAX(p.round) AS rounds, r.model_version,
                      SUM(p.mismatch) AS mismatches, COALESCE(json_extract(r.plan, '$.privacy_unit'), 'record'),
                      COALESCE(json_extract(r.plan, '$.accountant'), 'rdp')
               FROM privacy_spend p JOIN fl_runs r ON r.id = p.run_id
               GROUP BY p.device_id, p.run_id ORDER BY p.device_id, r.started_at"""
        ).fetchall()
        return [tuple(r) for r in rows]

    def devices(self, run_id: str) -> list[str]:
        """The devices that reported ε in a run."""
        return [
            r["device_id"]
            for r in self.store.db.query("SELECT DISTINCT device_id FROM privacy_spend WHERE run_id = ?", [run_id])
        ]


class ModelRecords:
    """models: the registry's versions `name@seq` with their weights, lineage and drift reference."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def last_seq(self, name: str) -> int:
        """The name's highest sequence number (0: none yet)."""
        row = self.store.db.execute("SELECT COALESCE(MAX(seq), 0) FROM models WHERE name = ?", [name]).fetchone()
        return int(row[0])

    def insert(
        self,
        version: str,
        name: str,
        seq: int,
        run_id: str,
        parent: str,
        weights: bytes,
        weights_sha256: str,
        lineage: str,
        reference: str,
        created_at: int,
    ) -> None:
        """One version; lineage and reference as JSON."""
        self.store.db.execute(
            "INSERT INTO models (version, name, seq, run_id, parent, weights, weights_sha256, lineage, reference,"
            " created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            [version, name, seq, run_id, parent, weights, weights_sha256, lineage, reference, created_at],
        )

    def get(self, version: str) -> tuple[Any, ...] | None:
        """(version, name, seq, run_id, parent, weights, weights_sha256, lineage, reference, created_at)."""
        row = self.store.db.execute(
            "SELECT version, name, seq, run_id, parent, weights, weights_sha256, lineage, reference, created_at"
            " FROM models WHERE version = ?",
            [version],
        ).fetchone()
        return None if row is None else tuple(row)

    def latest(self, name: str) -> str | None:
        row = self.store.db.execute(
            "SELECT version FROM models WHERE name = ? ORDER BY seq DESC LIMIT 1", [name]
        ).fetchone()
        return str(row[0]) if row else None

    def all(self) -> list[dict[str, Any]]:
        """Every version without its weights and reference, oldest first; lineage as JSON text."""
        return list(
            self.store.db.query(
                "SELECT version, name, seq, run_id, parent, weights_sha256, lineage, created_at FROM models"
                " ORDER BY created_at, seq"
            )
        )
