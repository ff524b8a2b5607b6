"""The coordinator's SQLite store (sqlite-utils, WAL), with versioned migrations.

Several processes share it: `fedfleet serve` and one-shot CLI commands such as `fedfleet assign`. Writes that
must not interleave (counter allocation) run in BEGIN IMMEDIATE transactions.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import sqlite_utils

from server.errors import DataDirError, NotFoundError

__all__ = ["SCHEMA_VERSION", "Store", "now_ms"]


def now_ms() -> int:
    return int(time.time() * 1000)


def _v1(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE devices (
            id TEXT PRIMARY KEY,
            fleet TEXT NOT NULL,
            labels TEXT NOT NULL DEFAULT '{}',
            hardware TEXT NOT NULL DEFAULT '{}',
            agent_version TEXT NOT NULL DEFAULT '',
            registered_at INTEGER NOT NULL,
            last_seen INTEGER NOT NULL,
            online INTEGER NOT NULL DEFAULT 0,
            running_release TEXT NOT NULL DEFAULT '',
            running_target TEXT NOT NULL DEFAULT '',
            running_counter INTEGER NOT NULL DEFAULT 0,
            update_state TEXT NOT NULL DEFAULT '',
            last_error TEXT NOT NULL DEFAULT '',
            last_event TEXT NOT NULL DEFAULT '',
            last_event_at INTEGER
        );
        CREATE INDEX devices_fleet ON devices (fleet);
        CREATE TABLE releases (
            id TEXT PRIMARY KEY,            -- name@version
            name TEXT NOT NULL,
            version TEXT NOT NULL,
            target_path TEXT NOT NULL UNIQUE,
            sha256 TEXT NOT NULL,
            length INTEGER NOT NULL,
            custom TEXT NOT NULL,
            created_at INTEGER NOT NULL
        );
        CREATE TABLE assignments (
            device_id TEXT NOT NULL REFERENCES devices (id),
            counter INTEGER NOT NULL,
            release_id TEXT NOT NULL REFERENCES releases (id),
            rollout_id TEXT NOT NULL DEFAULT '',
            signed BLOB NOT NULL,
            created_at INTEGER NOT NULL,
            published_at INTEGER,
            PRIMARY KEY (device_id, counter)
        );
        CREATE INDEX assignments_unpublished ON assignments (published_at) WHERE published_at IS NULL;
        CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            device_id TEXT NOT NULL,
            counter INTEGER NOT NULL,
            release_id TEXT NOT NULL,
            target_path TEXT NOT NULL,
            kind TEXT NOT NULL,
            reason TEXT NOT NULL,
            detail TEXT NOT NULL,
            device_time INTEGER NOT NULL,
            received_at INTEGER NOT NULL,
            via TEXT NOT NULL
        );
        CREATE INDEX events_device ON events (device_id, id);
        """
    )


def _v2(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE telemetry (
            device_id TEXT NOT NULL REFERENCES devices (id),
            sequence INTEGER NOT NULL,          -- last sequence the window covers
            first_sequence INTEGER NOT NULL,    -- first one (less than sequence for a summary)
            release_id TEXT NOT NULL,
            start_ms INTEGER NOT NULL,
            end_ms INTEGER NOT NULL,
            inferences INTEGER NOT NULL,
            errors INTEGER NOT NULL,
            payload BLOB NOT NULL,              -- the TelemetryWindow as received: all counts, for pooling
            received_at INTEGER NOT NULL,
            via TEXT NOT NULL,
            PRIMARY KEY (device_id, sequence)
        );
        CREATE INDEX telemetry_release ON telemetry (release_id, end_ms);
        CREATE TABLE telemetry_watermarks (
            device_id TEXT PRIMARY KEY REFERENCES devices (id),
            watermark INTEGER NOT NULL          -- every sequence up to here is stored
        );
        """
    )


def _v3(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE rollouts (
            id TEXT PRIMARY KEY,
            release_id TEXT NOT NULL REFERENCES releases (id),
            spec TEXT NOT NULL,                 -- RolloutSpec as JSON
            phase TEXT NOT NULL,
            wave INTEGER NOT NULL,              -- index into the plan; -1 before the canary
            wave_started_ms INTEGER NOT NULL,
            paused_from TEXT NOT NULL DEFAULT '',
            last_decision TEXT NOT NULL DEFAULT '',
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );
        CREATE TABLE rollout_devices (
            rollout_id TEXT NOT NULL REFERENCES rollouts (id),
            device_id TEXT NOT NULL REFERENCES devices (id),
            wave INTEGER NOT NULL,              -- the wave that takes this device, fixed at start
            previous_release TEXT NOT NULL,     -- what a rollback returns it to
            counter INTEGER,                    -- its assignment to the new release, once issued
            assigned_at INTEGER,
            rollback_counter INTEGER,           -- its assignment back to previous_release, once issued
            PRIMARY KEY (rollout_id, device_id)
        );
        CREATE INDEX rollout_devices_device ON rollout_devices (device_id);
        CREATE TABLE rollout_decisions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            rollout_id TEXT NOT NULL REFERENCES rollouts (id),
            wave INTEGER NOT NULL,
            at INTEGER NOT NULL,
            decision TEXT NOT NULL,
            reason TEXT NOT NULL,
            gates TEXT NOT NULL                 -- each gate's value, threshold and verdict, as JSON
        );
        CREATE INDEX rollout_decisions_rollout ON rollout_decisions (rollout_id, id);
        CREATE TABLE audit (
            seq INTEGER PRIMARY KEY,
            at INTEGER NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            subject TEXT NOT NULL,
            detail TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        );
        CREATE TABLE audit_head (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq INTEGER NOT NULL,
            hash TEXT NOT NULL
        );
        """
    )


def _v4(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE certificates (
            serial TEXT PRIMARY KEY,            -- hex
            subject TEXT NOT NULL,              -- common name: a device id, the coordinator, the broker
            kind TEXT NOT NULL,                 -- device, coordinator, grpc-server, broker
            issued_at INTEGER NOT NULL,
            not_after INTEGER NOT NULL,
            revoked_at INTEGER
        );
        CREATE INDEX certificates_subject ON certificates (subject);
        """
    )


def _v5(db: sqlite_utils.Database) -> None:
    """Federated training: runs and their rounds, round forensics, the privacy ledger, the model registry."""
    db.executescript(
        """
        CREATE TABLE fl_runs (
            id TEXT PRIMARY KEY,
            model_name TEXT NOT NULL,
            engine TEXT NOT NULL,               -- simulation, deployment
            plan TEXT NOT NULL,                 -- JSON: rounds, clients, DP settings, seed, code version
            status TEXT NOT NULL,               -- running, completed, failed
            error TEXT NOT NULL DEFAULT '',
            model_version TEXT NOT NULL DEFAULT '',
            started_at INTEGER NOT NULL,
            finished_at INTEGER
        );
        CREATE TABLE fl_rounds (
            run_id TEXT NOT NULL REFERENCES fl_runs(id),
            round INTEGER NOT NULL,             -- 0: the initial model, before any training
            selected INTEGER NOT NULL,
            completed INTEGER NOT NULL,
            refused INTEGER NOT NULL,
            failed INTEGER NOT NULL,
            train_loss REAL,
            test_loss REAL,
            test_accuracy REAL,
            epsilon_max REAL,
            seconds REAL NOT NULL,
            PRIMARY KEY (run_id, round)
        );
        CREATE TABLE fl_incidents (             -- which device, which round, what happened
            run_id TEXT NOT NULL REFERENCES fl_runs(id),
            round INTEGER NOT NULL,
            device_id TEXT NOT NULL,
            kind TEXT NOT NULL,                 -- error, refused, skipped-budget
            detail TEXT NOT NULL,
            at INTEGER NOT NULL
        );
        CREATE INDEX fl_incidents_run ON fl_incidents (run_id, round);
        CREATE TABLE privacy_spend (            -- the ε a device reported after each round (cumulative in the run)
            run_id TEXT NOT NULL REFERENCES fl_runs(id),
            device_id TEXT NOT NULL,
            round INTEGER NOT NULL,
            epsilon REAL NOT NULL,
            delta REAL NOT NULL,
            at INTEGER NOT NULL,
            PRIMARY KEY (run_id, device_id, round)
        );
        CREATE TABLE privacy_budgets (          -- per-device lifetime budgets; others use config epsilon_budget
            device_id TEXT PRIMARY KEY,
            budget REAL NOT NULL
        );
        CREATE TABLE models (
            version TEXT PRIMARY KEY,           -- name@seq
            name TEXT NOT NULL,
            seq INTEGER NOT NULL,
            run_id TEXT NOT NULL REFERENCES fl_runs(id),
            parent TEXT NOT NULL DEFAULT '',
            weights BLOB NOT NULL,              -- .npz of the state dict
            weights_sha256 TEXT NOT NULL,
            lineage TEXT NOT NULL,              -- JSON
            reference TEXT NOT NULL,            -- JSON: the federated drift reference
            created_at INTEGER NOT NULL,
            UNIQUE (name, seq)
        );
        """
    )


def _v6(db: sqlite_utils.Database) -> None:
    """Gate values over time, so the dashboard can draw them against their thresholds (decisions alone are sparse)."""
    db.executescript(
        """
        CREATE TABLE rollout_gate_samples (
            rollout_id TEXT NOT NULL REFERENCES rollouts (id),
            wave INTEGER NOT NULL,
            at INTEGER NOT NULL,
            gates TEXT NOT NULL                 -- each gate's value, threshold and verdict, as JSON
        );
        CREATE INDEX rollout_gate_samples_rollout ON rollout_gate_samples (rollout_id, at);
        """
    )


def _v7(db: sqlite_utils.Database) -> None:
    """The closed loop: fleet drift alarms, the retraining they lead to, alerts and their webhook deliveries."""
    db.executescript(
        """
        CREATE TABLE drift_alarms (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            fleet TEXT NOT NULL,
            release_id TEXT NOT NULL,
            metric TEXT NOT NULL,
            threshold REAL NOT NULL,
            value REAL NOT NULL,                -- when it opened
            peak REAL NOT NULL,
            last_value REAL,
            devices INTEGER NOT NULL,
            decision TEXT NOT NULL,             -- the policy's retrain.on_drift when it opened
            state TEXT NOT NULL,                -- open, resolved
            resolution TEXT NOT NULL DEFAULT '',
            opened_at INTEGER NOT NULL,
            resolved_at INTEGER
        );
        CREATE UNIQUE INDEX drift_alarms_open ON drift_alarms (fleet, release_id) WHERE state = 'open';
        CREATE TABLE retrain_jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            alarm_id INTEGER NOT NULL UNIQUE REFERENCES drift_alarms (id),  -- one retraining per alarm, ever
            fleet TEXT NOT NULL,
            from_release TEXT NOT NULL,
            cause TEXT NOT NULL,                -- "retrained because ..." (lineage)
            engine TEXT NOT NULL,
            state TEXT NOT NULL,                -- see server.loop.retrain.JobState
            run_id TEXT NOT NULL DEFAULT '',
            model_version TEXT NOT NULL DEFAULT '',
            release_id TEXT NOT NULL DEFAULT '',
            rollout_id TEXT NOT NULL DEFAULT '',
            error TEXT NOT NULL DEFAULT '',
            decided_by TEXT NOT NULL DEFAULT '',
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );
        CREATE TABLE alerts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,                 -- see server.loop.alerts.AlertKind
            subject TEXT NOT NULL,              -- a fleet, a rollout, a device, a retrain job
            key TEXT NOT NULL,                  -- one alert that is not resolved per key
            state TEXT NOT NULL,                -- open, acknowledged, resolved
            summary TEXT NOT NULL,
            detail TEXT NOT NULL,               -- JSON
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            acknowledged_by TEXT NOT NULL DEFAULT '',
            resolved_at INTEGER
        );
        CREATE UNIQUE INDEX alerts_live_key ON alerts (key) WHERE state != 'resolved';
        CREATE TABLE alert_deliveries (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            alert_id INTEGER NOT NULL REFERENCES alerts (id),
            event TEXT NOT NULL,                -- alert.opened, alert.resolved
            url TEXT NOT NULL,
            state TEXT NOT NULL,                -- pending, delivered, failed (retries used up), dropped (queue full)
            attempts INTEGER NOT NULL DEFAULT 0,
            last_result TEXT NOT NULL DEFAULT '',
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );
        CREATE INDEX alert_deliveries_pending ON alert_deliveries (state) WHERE state = 'pending';
        """
    )


def _v8(db: sqlite_utils.Database) -> None:
    """Freshness: the director's current signed statement per device ("your latest assignment is counter N"), and
    what each device last said about its own freshness."""
    db.executescript(
        """
        CREATE TABLE freshness (
            device_id TEXT PRIMARY KEY REFERENCES devices (id),
            counter INTEGER NOT NULL,           -- the device's highest assignment counter when signed
            issued_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            signed BLOB NOT NULL,               -- the SignedFreshness as served
            published_at INTEGER                -- NULL: not yet pushed on MQTT
        );
        CREATE INDEX freshness_unpublished ON freshness (published_at) WHERE published_at IS NULL;
        ALTER TABLE devices ADD COLUMN stale INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE devices ADD COLUMN fresh_until INTEGER NOT NULL DEFAULT 0;
        """
    )


def _v9(db: sqlite_utils.Database) -> None:
    """The privacy ledger keeps, per round, what the client reported beside what the coordinator recomputed and
    whether they disagreed (the ledger's own fact, whatever retention does to incidents); SQLite itself refuses an
    ε below the one recorded for the run, lowering one, and deleting ledger rows."""
    db.executescript(
        """
        ALTER TABLE privacy_spend ADD COLUMN reported_epsilon REAL;    -- the client's figure; NULL: unreadable
        ALTER TABLE privacy_spend ADD COLUMN recomputed_epsilon REAL;  -- the coordinator's accountant (NULL before v9)
        ALTER TABLE privacy_spend ADD COLUMN mismatch INTEGER NOT NULL DEFAULT 0;
        CREATE TRIGGER privacy_spend_never_below BEFORE INSERT ON privacy_spend
        WHEN NEW.epsilon < (SELECT MAX(epsilon) FROM privacy_spend
                            WHERE run_id = NEW.run_id AND device_id = NEW.device_id)
        BEGIN SELECT RAISE(ABORT, 'privacy ledger: an epsilon below the one recorded for the run'); END;
        CREATE TRIGGER privacy_spend_never_lowered BEFORE UPDATE OF epsilon ON privacy_spend
        WHEN NEW.epsilon < OLD.epsilon
        BEGIN SELECT RAISE(ABORT, 'privacy ledger: a recorded epsilon is never lowered'); END;
        CREATE TRIGGER privacy_spend_kept BEFORE DELETE ON privacy_spend
        BEGIN SELECT RAISE(ABORT, 'privacy ledger: rows are never deleted'); END;
        """
    )


def _v10(db: sqlite_utils.Database) -> None:
    """The privacy ledger's spends other than training, each named by its purpose: a run's drift-reference count
    queries (server/fl/private_counts.py). One row per device, run, purpose and query, ε cumulative over the
    purpose's queries in the run; like privacy_spend, SQLite refuses lowering an ε and deleting a row."""
    db.executescript(
        """
        CREATE TABLE privacy_query_spend (
            run_id TEXT NOT NULL REFERENCES fl_runs(id),
            device_id TEXT NOT NULL,
            purpose TEXT NOT NULL,              -- drift-reference
            step INTEGER NOT NULL,              -- 1, 2, ...: the purpose's queries in the order they were answered
            query TEXT NOT NULL,                -- feature-histogram, reference-counts
            epsilon REAL NOT NULL,              -- the purpose's ε in the run after this query (cumulative)
            delta REAL NOT NULL,
            noise_multiplier REAL NOT NULL,     -- Gaussian noise sd / L2 sensitivity
            sensitivity REAL NOT NULL,          -- the query's L2 sensitivity to one record
            reported_epsilon REAL,              -- the device's figure; NULL: none or unreadable
            at INTEGER NOT NULL,
            PRIMARY KEY (run_id, device_id, purpose, step)
        );
        CREATE TRIGGER privacy_query_spend_never_below BEFORE INSERT ON privacy_query_spend
        WHEN NEW.epsilon < (SELECT MAX(epsilon) FROM privacy_query_spend
                            WHERE run_id = NEW.run_id AND device_id = NEW.device_id AND purpose = NEW.purpose)
        BEGIN SELECT RAISE(ABORT, 'privacy ledger: an epsilon below the one recorded for the run'); END;
        CREATE TRIGGER privacy_query_spend_never_lowered BEFORE UPDATE OF epsilon ON privacy_query_spend
        WHEN NEW.epsilon < OLD.epsilon
        BEGIN SELECT RAISE(ABORT, 'privacy ledger: a recorded epsilon is never lowered'); END;
        CREATE TRIGGER privacy_query_spend_kept BEFORE DELETE ON privacy_query_spend
        BEGIN SELECT RAISE(ABORT, 'privacy ledger: rows are never deleted'); END;
        """
    )


def _v11(db: sqlite_utils.Database) -> None:
    """People who use the API: a role each and the SHA-256 of their token (tokens are 32 random bytes, so a hash
    without a per-user salt cannot be reversed, and a sign-in finds its user by the hash). Revoked users stay."""
    db.executescript(
        """
        CREATE TABLE users (
            name TEXT PRIMARY KEY,
            role TEXT NOT NULL,                 -- server.roles.Role
            token_hash TEXT NOT NULL UNIQUE,    -- sha256 hex of the token; the token itself is never stored
            created_at INTEGER NOT NULL,
            rotated_at INTEGER NOT NULL,
            revoked_at INTEGER                  -- NULL: may sign in
        );
        """
    )


def _v12(db: sqlite_utils.Database) -> None:
    """Retired releases (`fedfleet releases retire`): taken out of the update repository, the release row kept for
    the assignments, rollouts and lineage that name it."""
    db.executescript(
        """
        CREATE TABLE retired_releases (
            release_id TEXT PRIMARY KEY REFERENCES releases (id),
            retired_at INTEGER NOT NULL,
            actor TEXT NOT NULL
        );
        """
    )


def _v13(db: sqlite_utils.Database) -> None:
    """Consent (issue 20): every statement of a device's consent to a purpose, with its time and source, never
    updated or deleted (the newest is the device's consent now); and per training run, each greeted device's
    consent as the run saw it (the ledger and the lineage name who consented)."""
    db.executescript(
        """
        CREATE TABLE consent (
            id INTEGER PRIMARY KEY,
            device_id TEXT NOT NULL,
            purpose TEXT NOT NULL,              -- server.store.consent.PURPOSES
            granted INTEGER NOT NULL CHECK (granted IN (0, 1)),
            source TEXT NOT NULL,               -- "agent" (agent.toml, reported at registration) or "user:NAME"
            recorded_at INTEGER NOT NULL
        );
        CREATE INDEX consent_by_device ON consent (device_id, purpose, id);
        CREATE TRIGGER consent_kept_update BEFORE UPDATE ON consent
        BEGIN SELECT RAISE(ABORT, 'consent: statements are never changed'); END;
        CREATE TRIGGER consent_kept_delete BEFORE DELETE ON consent
        BEGIN SELECT RAISE(ABORT, 'consent: statements are never deleted'); END;
        CREATE TABLE fl_run_consent (
            run_id TEXT NOT NULL,
            device_id TEXT NOT NULL,
            granted INTEGER NOT NULL CHECK (granted IN (0, 1)),
            consent_id INTEGER REFERENCES consent (id),   -- the statement it rests on; NULL: none recorded
            PRIMARY KEY (run_id, device_id)
        );
        """
    )


def _v14(db: sqlite_utils.Database) -> None:
    """The monitoring ledger (issue 19): ε each device spent on noised telemetry windows, a budget of the device's
    own apart from the training privacy ledger (privacy_spend, privacy_query_spend). One row per stored noised
    window (or budget-spent marker), with the device's own figures beside it; never changed or deleted, so
    telemetry retention pruning a window keeps what it cost."""
    db.executescript(
        """
        CREATE TABLE monitoring_spend (
            device_id TEXT NOT NULL,
            sequence INTEGER NOT NULL,          -- the window's sequence (a summary's last)
            first_sequence INTEGER NOT NULL,
            release_id TEXT NOT NULL,
            epsilon REAL NOT NULL,              -- ε the window spent; 0: a marker that the budget is spent
            noise_scale REAL NOT NULL,          -- Laplace scale b on each count
            device_spent REAL NOT NULL,         -- the device's monitoring ε spent so far, as it reports
            device_budget REAL NOT NULL,        -- the device's monitoring budget, as it reports
            exhausted INTEGER NOT NULL CHECK (exhausted IN (0, 1)),  -- no more noised windows from it
            received_at INTEGER NOT NULL,
            PRIMARY KEY (device_id, sequence)
        );
        CREATE TRIGGER monitoring_spend_kept_update BEFORE UPDATE ON monitoring_spend
        BEGIN SELECT RAISE(ABORT, 'monitoring ledger: rows are never changed'); END;
        CREATE TRIGGER monitoring_spend_kept_delete BEFORE DELETE ON monitoring_spend
        BEGIN SELECT RAISE(ABORT, 'monitoring ledger: rows are never deleted'); END;
        """
    )


def _v15(db: sqlite_utils.Database) -> None:
    """Telemetry reads that cost what they return, not what the table holds (issue 20: a month of a fleet's
    windows is millions of rows). The drift page, the data-quality watch and `fedfleet drift` ask for the windows
    that ended since a time: an index on end_ms. /metrics counts the windows stored by transport: a counter kept
    by a trigger on insert (pruning does not lower it, as a Prometheus counter must not go down), seeded with what
    the table holds."""
    db.executescript(
        """
        CREATE INDEX telemetry_end ON telemetry (end_ms);
        CREATE TABLE telemetry_ingested (
            via TEXT PRIMARY KEY,
            windows INTEGER NOT NULL
        );
        INSERT INTO telemetry_ingested (via, windows) SELECT via, count(*) FROM telemetry GROUP BY via;
        CREATE TRIGGER telemetry_ingested_count AFTER INSERT ON telemetry
        BEGIN
            INSERT INTO telemetry_ingested (via, windows) VALUES (NEW.via, 1)
            ON CONFLICT (via) DO UPDATE SET windows = windows + 1;
        END;
        """
    )


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _v1,
    _v2,
    _v3,
    _v4,
    _v5,
    _v6,
    _v7,
    _v8,
    _v9,
    _v10,
    _v11,
    _v12,
    _v13,
    _v14,
    _v15,
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class Release:
    id: str
    name: str
    version: str
    target_path: str
    sha256: str
    length: int
    custom: dict[str, Any]
    created_at: int


class Store:
    """The coordinator's database. A context manager: `with Store(path) as store:` closes it on the way out."""

    def __init__(self, path: Path) -> None:
        self.path = path
        conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._known_devices: set[str] = set()
        self.migrate()

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any exception. Inside an open transaction it joins it, so a
        caller can make several library calls (assignments, a rollout decision, its audit entry) one unit."""
        if self.db.conn.in_transaction:
            yield self.db
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> int:
        """Apply missing migrations in order; returns how many ran."""
        ran = 0
        with self.transaction() as db:
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise DataDirError(
                    f"database {self.path} is schema {version}, newer than this fedfleet ({SCHEMA_VERSION}); upgrade it"
                )
            for migration in MIGRATIONS[version:]:
                migration(db)
                ran += 1
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return ran

    # ----- devices -----

    def register_device(
        self, device_id: str, fleet: str, labels: dict[str, str], hardware: dict[str, Any], agent_version: str
    ) -> None:
        """A device's registration. Its fleet and labels are taken once, at its first registration (its enrollment
        bundle says them); after that they are the coordinator's (`place_device`), whatever the device claims."""
        now = now_ms()
        with self.transaction() as db:
            db.execute(
                """INSERT INTO devices (id, fleet, labels, hardware, agent_version, registered_at, last_seen)
                   VALUES (?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (id) DO UPDATE SET hardware = excluded.hardware,
                     agent_version = excluded.agent_version, last_seen = excluded.last_seen""",
                [
                    device_id,
                    fleet,
                    json.dumps(labels, sort_keys=True),
                    json.dumps(hardware, sort_keys=True),
                    agent_version,
                    now,
                    now,
                ],
            )

    def place_device(self, device_id: str, fleet: str | None, labels: dict[str, str] | None) -> dict[str, Any]:
        """Move a registered device to another fleet and/or give it these labels (the operator's word)."""
        with self.transaction() as db:
            before = self.device(device_id)
            db.execute(
                "UPDATE devices SET fleet = ?, labels = ? WHERE id = ?",
                [
                    before["fleet"] if fleet is None else fleet,
                    json.dumps(before["labels"] if labels is None else labels, sort_keys=True),
                    device_id,
                ],
            )
        return self.device(device_id)

    def device(self, device_id: str) -> dict[str, Any]:
        rows = list(self.db.query("SELECT * FROM devices WHERE id = ?", [device_id]))
        if not rows:
            raise NotFoundError(f"no device {device_id!r}; a device appears when its agent first registers")
        return _device_row(rows[0])

    def devices(self, fleet: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM devices" + (" WHERE fleet = ?" if fleet else "") + " ORDER BY id"
        return [_device_row(r) for r in self.db.query(sql, [fleet] if fleet else [])]

    def devices_with_labels(self, labels: dict[str, str], fleet: str | None = None) -> list[str]:
        """Ids of the devices (of a fleet) whose labels include all of `labels`: a cohort."""
        return [d["id"] for d in self.devices(fleet) if all(d["labels"].get(k) == v for k, v in labels.items())]

    def fleets(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT fleet FROM devices ORDER BY fleet")]

    def device_ids(self, fleet: str) -> list[str]:
        return [r["id"] for r in self.db.query("SELECT id FROM devices WHERE fleet = ? ORDER BY id", [fleet])]

    def set_status(
        self,
        device_id: str,
        online: bool,
        running_release: str,
        running_target: str,
        running_counter: int,
        update_state: str,
        last_error: str,
        stale: bool = False,
        fresh_until: int = 0,
    ) -> bool:
        cursor = self.db.execute(
            """UPDATE devices SET online = ?, running_release = ?, running_target = ?, running_counter = ?,
                 update_state = ?, last_error = ?, stale = ?, fresh_until = ?, last_seen = ? WHERE id = ?""",
            [
                int(online),
                running_release,
                running_target,
                running_counter,
                update_state,
                last_error,
                int(stale),
                fresh_until,
                now_ms(),
                device_id,
            ],
        )
        return cursor.rowcount == 1

    def set_offline(self, device_id: str) -> None:
        self.db.execute("UPDATE devices SET online = 0 WHERE id = ?", [device_id])

    def count_devices(
        self,
        fleet: str | None = None,
        running_release: str | None = None,
        online: bool | None = None,
        last_event: str | None = None,
    ) -> int:
        """How many devices match every condition given (all of them, with none)."""
        conditions = {"fleet": fleet, "running_release": running_release, "last_event": last_event}
        where: list[tuple[str, str | int]] = [(f"{name} = ?", v) for name, v in conditions.items() if v is not None]
        if online is not None:
            where.append(("online = ?", int(online)))
        sql = "SELECT count(*) FROM devices" + (" WHERE " + " AND ".join(w for w, _ in where) if where else "")
        return int(self.db.execute(sql, [v for _, v in where]).fetchone()[0])

    def is_device(self, device_id: str) -> bool:
        """Whether the device has registered. Known ids are remembered (devices are never deleted; revocation
        is a state of the row), which keeps telemetry ingestion off the database for this check."""
        if device_id in self._known_devices:
            return True
        known = self.db.execute("SELECT 1 FROM devices WHERE id = ?", [device_id]).fetchone() is not None
        if known:
            self._known_devices.add(device_id)
        return known

    # ----- events -----

    def record_events(self, events: list[dict[str, Any]], via: str) -> int:
        """Store events from known devices; returns how many were stored."""
        if not events:
            return 0
        received = now_ms()
        with self.transaction() as db:
            for e in events:
                db.execute(
                    """INSERT INTO events (device_id, counter, release_id, target_path, kind, reason, detail,
                         device_time, received_at, via) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    [
                        e["device_id"],
                        e["counter"],
                        e["release_id"],
                        e["target_path"],
                        e["kind"],
                        e["reason"],
                        e["detail"],
                        e["device_time"],
                        received,
                        via,
                    ],
                )
                db.execute(
                    "UPDATE devices SET last_event = ?, last_event_at = ?, last_seen = ? WHERE id = ?",
                    [f"{e['kind']}{': ' + e['reason'] if e['reason'] else ''}", received, received, e["device_id"]],
                )
        return len(events)

    def count_events(self) -> int:
        """How many update events are stored, of every device."""
        return int(self.db.execute("SELECT count(*) FROM events").fetchone()[0])

    def events(self, device_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        sql = "SELECT * FROM events" + (" WHERE device_id = ?" if device_id else "") + " ORDER BY id DESC LIMIT ?"
        return list(self.db.query(sql, ([device_id] if device_id else []) + [limit]))

    # ----- releases -----

    def add_release(self, release: Release) -> None:
        self.db.table("releases").insert({**release.__dict__, "custom": json.dumps(release.custom, sort_keys=True)})

    def release(self, release_id: str) -> Release:
        rows = list(self.db.query("SELECT * FROM releases WHERE id = ?", [release_id]))
        if not rows:
            raise NotFoundError(f"no release {release_id!r}; `fedfleet releases list` shows them")
        return _release_row(rows[0])

    def releases(self) -> list[Release]:
        return [_release_row(r) for r in self.db.query("SELECT * FROM releases ORDER BY created_at, id")]

    # ----- assignments -----

    def current_assignment(self, device_id: str) -> dict[str, Any] | None:
        rows = self.assignments(device_id, limit=1)
        return rows[0] if rows else None

    def assignments(self, device_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """A device's assignments, newest (highest counter) first."""
        return list(
            self.db.query(
                "SELECT * FROM assignments WHERE device_id = ? ORDER BY counter DESC LIMIT ?", [device_id, limit]
            )
        )

    def highest_counters(self, device_ids: Sequence[str]) -> dict[str, int]:
        """Each device's highest assignment counter (0: none yet)."""
        highest = {d: 0 for d in device_ids}
        placeholders = ",".join("?" * len(device_ids))
        for row in self.db.query(
            "SELECT device_id, max(counter) AS c FROM assignments"
            f" WHERE device_id IN ({placeholders}) GROUP BY device_id",
            list(device_ids),
        ):
            highest[row["device_id"]] = row["c"]
        return highest

    def add_assignment(
        self, device_id: str, counter: int, release_id: str, rollout_id: str, signed: bytes, created_at: int
    ) -> None:
        self.db.execute(
            """INSERT INTO assignments (device_id, counter, release_id, rollout_id, signed, created_at)
               VALUES (?, ?, ?, ?, ?, ?)""",
            [device_id, counter, release_id, rollout_id, signed, created_at],
        )

    def unpublished_assignments(self, limit: int = 5000) -> list[dict[str, Any]]:
        """The newest unpublished assignment per device (older ones are superseded by it)."""
        return list(
            self.db.query(
                """SELECT a.* FROM assignments a
               WHERE a.published_at IS NULL
                 AND a.counter = (SELECT max(counter) FROM assignments b WHERE b.device_id = a.device_id)
               LIMIT ?""",
                [limit],
            )
        )

    def mark_published(self, keys: list[tuple[str, int]]) -> None:
        now = now_ms()
        with self.transaction() as db:
            db.conn.executemany(
                "UPDATE assignments SET published_at = ? WHERE device_id = ? AND counter <= ? AND published_at IS NULL",
                [(now, d, c) for d, c in keys],
            )

    # ----- certificates -----

    def record_certificate(self, serial: str, subject: str, kind: str, not_after_ms: int) -> None:
        self.db.execute(
            "INSERT INTO certificates (serial, subject, kind, issued_at, not_after) VALUES (?, ?, ?, ?, ?)",
            [serial, subject, kind, now_ms(), not_after_ms],
        )

    def revoke_certificates(self, subject: str, kind: str = "device") -> list[str]:
        """Revoke every live certificate of a subject; returns their serials (empty: none was live)."""
        with self.transaction() as db:
            serials = [
                r[0]
                for r in db.execute(
                    "SELECT serial FROM certificates WHERE subject = ? AND kind = ? AND revoked_at IS NULL",
                    [subject, kind],
                )
            ]
            db.execute(
                "UPDATE certificates SET revoked_at = ? WHERE subject = ? AND kind = ? AND revoked_at IS NULL",
                [now_ms(), subject, kind],
            )
        return serials

    def live_certificates(self, subject: str, kind: str = "device") -> list[str]:
        """Serials of a subject's certificates that are not revoked (empty: not enrolled, or revoked)."""
        sql = "SELECT serial FROM certificates WHERE subject = ? AND kind = ? AND revoked_at IS NULL"
        return [r[0] for r in self.db.execute(sql, [subject, kind])]

    def revoked_certificates(self) -> list[tuple[str, int]]:
        return [(r[0], r[1]) for r in self.db.execute("SELECT serial, revoked_at FROM certificates WHERE revoked_at")]

    def certificate_revoked(self, serial: str) -> bool:
        row = self.db.execute("SELECT revoked_at FROM certificates WHERE serial = ?", [serial]).fetchone()
        return row is None or row[0] is not None  # unknown serials are not ours to trust either

    def assignment_of(self, device_id: str) -> str:
        row = self.current_assignment(device_id)
        return row["release_id"] if row else ""


def _device_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **row,
        "labels": json.loads(row["labels"]),
        "hardware": json.loads(row["hardware"]),
        "online": bool(row["online"]),
        "stale": bool(row.get("stale", 0)),
    }


def _release_row(row: dict[str, Any]) -> Release:
    return Release(**{**row, "custom": json.loads(row["custom"])})
