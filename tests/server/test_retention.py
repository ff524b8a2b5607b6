"""Retention: a day of synthetic telemetry windows, update events and training incidents, stored through the
store on a real SQLite file; the dry run changes nothing, the run prunes in batches, keeps what live rollouts,
running trainings, the audit trail and the privacy ledger need, and audits the counts; bad policy values are
refused with one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from server import audit
from server.datadir import DataDir
from server.fl.registry import Ledger
from server.loop import retention as retention_module
from server.loop.retention import DAY_MS, prune
from server.policy import PolicyError, Retention, load_policy
from server.rollout.engine import Phase
from server.store import SCHEMA_VERSION, Release, Store, now_ms
from server.store.dashboard import DashboardReads
from server.store.rollouts import RolloutRecords
from server.store.telemetry import TelemetryRecords
from server.store.training import LedgerRecords, RunRecords
from tests.support import fedfleet

DEVICES = ["pi-a", "pi-b", "pi-c"]
OLD, LIVE, PREVIOUS = "digits@1.0.0", "digits@2.0.0", "digits@1.5.0"
MINUTE = 60_000


def _counts(store: Store) -> dict[str, int]:
    return {
        t: int(store.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
        for t in ("telemetry", "events", "fl_incidents", "privacy_spend", "audit", "telemetry_watermarks")
    }


def _fill_a_day(store: Store, now: int) -> None:
    """Per device a window per minute over the past day (the newest release the last two hours, a live rollout's),
    an event per window, a finished and a running training with incidents, the ledger's rows."""
    for d in DEVICES:
        store.register_device(d, "lab", {}, {}, "test")
    for r in (OLD, PREVIOUS, LIVE):
        name, version = r.split("@")
        store.add_release(Release(r, name, version, f"{name}/{version}/model.tflite", "0" * 64, 1, {}, now))
    records = TelemetryRecords(store)
    events = []
    for d in DEVICES:
        with store.transaction():
            for minute in range(24 * 60):
                at = now - DAY_MS + minute * MINUTE
                release = LIVE if minute >= 22 * 60 else OLD
                window = pb.TelemetryWindow(
                    device_id=d, sequence=minute + 1, first_sequence=minute + 1, release_id=release,
                    start_ms=at - MINUTE, end_ms=at, inferences=10, errors=0,
                )  # fmt: skip
                records.insert(window, at, "mqtt")
                events.append({
                    "device_id": d, "counter": 1, "release_id": release, "target_path": "t", "kind": "committed",
                    "reason": "", "detail": "", "device_time": at,
                })  # fmt: skip
            records.set_watermark(d, 24 * 60)
    store.record_events(events, "mqtt")
    rollouts = RolloutRecords(store)
    with store.transaction():
        rollouts.insert("r-live", LIVE, "{}", str(Phase.BAKING), now)
        rollouts.add_devices("r-live", [(d, 0, PREVIOUS) for d in DEVICES])
    runs = RunRecords(store)
    runs.insert("run-done", "digits", "simulation", "{}", "completed", now - DAY_MS)
    runs.insert("run-going", "digits", "simulation", "{}", "running", now - DAY_MS)
    for run in ("run-done", "run-going"):
        for i in range(100):
            runs.add_incident(run, 1, DEVICES[i % 3], "error", "boom", now - DAY_MS + i * MINUTE)
            LedgerRecords(store).record(run, DEVICES[i % 3], i, 0.01 * i, 1e-5, now - DAY_MS)
    audit.append(store, "test.fill", "a day", {})


@pytest.fixture
def filled(datadir: DataDir) -> tuple[DataDir, int]:
    now = now_ms()
    with datadir.store() as store:
        _fill_a_day(store, now)
    return datadir, now


def test_dry_run_counts_and_changes_nothing(filled: tuple[DataDir, int]) -> None:
    d, now = filled
    with d.store() as store:
        before = _counts(store)
        report = prune(store, Retention(telemetry_days=0.5, events_days=0.5, incidents_days=0.01), now, dry_run=True)
        after = _counts(store)
    assert after == before
    # Windows received more than 12 h ago, on the old release (the live rollout's are kept).
    assert report.counts["telemetry"] == len(DEVICES) * 12 * 60
    assert report.counts["events"] == 0  # every event arrived now, by the coordinator's clock
    assert report.counts["fl_incidents"] == 100  # the finished run's; the running one's are kept
    assert report.protected_releases == [PREVIOUS, LIVE]


def test_run_prunes_in_batches_keeps_what_is_needed_and_audits_the_counts(filled: tuple[DataDir, int]) -> None:
    d, now = filled
    with d.store() as store:
        before = _counts(store)
        ledger_before = Ledger(store, 10.0).rows()
        later = now + DAY_MS  # a day on: every event is a day old
        retention = Retention(telemetry_days=0.5, events_days=0.5, incidents_days=0.5, batch_rows=500)
        report = prune(store, retention, later, pause_seconds=0)
        after = _counts(store)
        kept = {r[0] for r in store.db.execute("SELECT DISTINCT release_id FROM telemetry")}
        kept_events = {r[0] for r in store.db.execute("SELECT DISTINCT release_id FROM events")}
        checked, problems = audit.verify(store)
        entry = audit.entries(store, 1)[0]
        ledger_after = Ledger(store, 10.0).rows()
        running = RunRecords(store).incidents("run-going")
        watermarks = [TelemetryRecords(store).watermark(dev) for dev in DEVICES]

    old_windows = len(DEVICES) * 22 * 60
    assert report.counts == {"telemetry": old_windows, "events": old_windows, "fl_incidents": 100}
    assert report.batches >= old_windows // 500 * 2  # telemetry and events each went 500 rows at a time
    assert after["telemetry"] == before["telemetry"] - old_windows and kept == {LIVE}
    assert after["events"] == before["events"] - old_windows and kept_events == {LIVE}
    assert len(running) == 100 and after["fl_incidents"] == 100
    assert after["privacy_spend"] == before["privacy_spend"] and ledger_after == ledger_before
    assert watermarks == [24 * 60] * len(DEVICES)  # ingestion still knows what it has confirmed
    assert not problems and checked == before["audit"] + 1
    assert entry["action"] == "retention.prune" and entry["seq"] == report.audit_seq
    assert entry["detail"]["deleted"] == report.counts
    assert entry["detail"]["kept_releases"] == [PREVIOUS, LIVE]

    # Nothing left to go: a second run deletes nothing and writes no audit entry.
    with d.store() as store:
        again = prune(store, retention, later, pause_seconds=0)
        assert again.counts == {"telemetry": 0, "events": 0, "fl_incidents": 0} and again.audit_seq is None
        assert _counts(store)["audit"] == after["audit"]


def test_a_prune_works_at_most_its_duty_of_the_time(
    filled: tuple[DataDir, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each pause is at least (1 - duty) / duty times the batch before it: with a clock on which every batch takes
    10 ms, a prune at duty 0.1 pauses 90 ms after each."""
    d, now = filled
    clock = iter(i * 0.010 for i in range(10**6))  # each reading 10 ms after the one before
    slept: list[float] = []
    monkeypatch.setattr(retention_module.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(retention_module.time, "sleep", slept.append)
    with d.store() as store:
        report = prune(store, Retention(telemetry_days=0.5, batch_rows=500), now + DAY_MS, pause_seconds=0)
    assert report.batches == len(slept) + 1  # no pause after the last batch
    assert slept and all(s == pytest.approx(0.090) for s in slept), slept


def test_zero_days_keeps_forever(filled: tuple[DataDir, int]) -> None:
    d, now = filled
    with d.store() as store:
        before = _counts(store)
        report = prune(store, Retention(telemetry_days=0, events_days=0, incidents_days=0), now + 30 * DAY_MS)
        assert report.counts == {} and _counts(store) == before


def test_cli_dry_run_then_run(filled: tuple[DataDir, int]) -> None:
    d, _ = filled
    (d.root / "policy.toml").write_text("[retention]\ntelemetry_days = 0.5\nevents_days = 0\nincidents_days = 0\n")
    with d.store() as store:
        before = _counts(store)
    dry = fedfleet(d, "retention", "run", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    doc = json.loads(dry.stdout)
    # Received more than 12 h before the command ran (a few seconds after the fill: the 720th minute may go too).
    assert doc["dry_run"] and list(doc["counts"]) == ["telemetry"]
    assert doc["counts"]["telemetry"] in (len(DEVICES) * 12 * 60, len(DEVICES) * (12 * 60 + 1))
    with d.store() as store:
        assert _counts(store) == before
    done = fedfleet(d, "retention", "run")
    assert done.returncode == 0, done.stderr
    assert "Audited as entry" in done.stdout
    with d.store() as store:
        assert _counts(store)["telemetry"] == before["telemetry"] - doc["counts"]["telemetry"]
        assert audit.entries(store, 1)[0]["actor"] == "cli"
    assert fedfleet(d, "audit", "verify").returncode == 0


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[retention]\ntelemetry_days = -1\n", "retention.telemetry_days must be a non-negative number"),
        ('[retention]\nevents_days = "a week"\n', "retention.events_days must be a non-negative number"),
        ("[retention]\nincidents_days = nan\n", "retention.incidents_days must be a non-negative number"),
        ("[retention]\nbatch_rows = 0\n", "retention.batch_rows must be a whole number from 1 to 10000"),
        ("[retention]\nbatch_rows = 2.5\n", "retention.batch_rows must be a whole number"),
        ("[retention]\ninterval_seconds = 0\n", "retention.interval_seconds must be at least 1"),
        ("[retention]\nkeep = true\n", "unknown setting retention.keep"),
        ("[audit]\nanchor_seconds = -5\n", "audit.anchor_seconds must be a non-negative number"),
    ],
)
def test_bad_policy_values_are_refused(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=words):
        load_policy(path)


def test_cli_refuses_a_bad_policy_and_changes_nothing(filled: tuple[DataDir, int]) -> None:
    d, _ = filled
    (d.root / "policy.toml").write_text("[retention]\ntelemetry_days = -1\n")
    with d.store() as store:
        before = _counts(store)
    done = fedfleet(d, "retention", "run")
    assert done.returncode == 1
    assert "retention.telemetry_days must be a non-negative number" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    with d.store() as store:
        assert _counts(store) == before


def test_policy_defaults() -> None:
    policy = load_policy(Path("/nonexistent/policy.toml"))
    assert policy.retention == Retention(30.0, 90.0, 180.0, 3600.0, 500)
    assert policy.audit_anchor_seconds == 3600.0


def _ingested(store: Store) -> dict[str, int]:
    return dict(DashboardReads(store).windows_by_transport())


def test_the_ingested_counter_counts_every_stored_window_and_a_prune_does_not_lower_it(
    filled: tuple[DataDir, int],
) -> None:
    d, now = filled
    with d.store() as store:
        window = pb.TelemetryWindow(device_id="pi-a", sequence=24 * 60 + 1, release_id=LIVE, end_ms=now)
        TelemetryRecords(store).insert(window, now, "grpc")
        before = _ingested(store)
        prune(store, Retention(telemetry_days=0.5, events_days=0, incidents_days=0), now + DAY_MS, pause_seconds=0)
        left = _counts(store)["telemetry"]
        after = _ingested(store)
    assert before == {"mqtt": len(DEVICES) * 24 * 60, "grpc": 1}
    assert after == before and left < sum(before.values())  # a Prometheus counter never goes down


def test_an_older_database_seeds_the_counter_from_the_windows_it_holds(filled: tuple[DataDir, int]) -> None:
    d, _ = filled
    with d.store() as store:  # back to schema 14, as a coordinator before the counter left it
        store.db.executescript(
            "DROP TRIGGER telemetry_ingested_count; DROP TABLE telemetry_ingested; DROP INDEX telemetry_end;"
        )
        store.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    with d.store() as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert _ingested(store) == {"mqtt": len(DEVICES) * 24 * 60}


def test_reads_of_recent_telemetry_walk_an_index_not_the_table(filled: tuple[DataDir, int]) -> None:
    """The drift page, the data-quality watch and /metrics cost what they return: none of their statements scans the
    telemetry table (a month of a fleet's windows is millions of rows)."""
    d, now = filled
    with d.store() as store:
        statements: list[str] = []
        store.db.conn.set_trace_callback(statements.append)
        DashboardReads(store).recent_windows(now - 5 * MINUTE, "", 100)
        list(TelemetryRecords(store).payloads_since(now - 5 * MINUTE))
        DashboardReads(store).windows_by_transport()
        TelemetryRecords(store).stale_data_devices(now)
        TelemetryRecords(store).last_inference_ms(DEVICES, LIVE)
        store.db.conn.set_trace_callback(None)
        selects = [sql for sql in statements if sql.startswith("SELECT")]  # not sqlite_utils' savepoints
        plans = {sql: [row[3] for row in store.db.execute(f"EXPLAIN QUERY PLAN {sql}")] for sql in selects}
    assert len(plans) == 5
    for sql, plan in plans.items():
        assert not any(step.split()[:2] in (["SCAN", "telemetry"], ["SCAN", "t"]) for step in plan), (sql, plan)


def test_the_last_inference_is_the_newest_window_that_had_one(filled: tuple[DataDir, int]) -> None:
    d, now = filled
    with d.store() as store:
        records = TelemetryRecords(store)
        idle = pb.TelemetryWindow(device_id="pi-a", sequence=24 * 60 + 1, release_id=LIVE, end_ms=now + MINUTE)
        records.insert(idle, now, "mqtt")  # newer, but without an inference
        last = records.last_inference_ms(DEVICES)
        of_old = records.last_inference_ms(["pi-a"], OLD)
        stale = {r["device_id"] for r in records.stale_data_devices(now)}
    newest = now - DAY_MS + (24 * 60 - 1) * MINUTE
    assert last == {dev: newest for dev in DEVICES}
    assert of_old == {"pi-a": now - DAY_MS + (22 * 60 - 1) * MINUTE}
    assert stale == set(DEVICES)  # each one's last inference ended before `now`
