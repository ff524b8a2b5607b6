"""Housekeeping that `fedfleet serve` does in a thread of its own: retention (old telemetry windows, update events
and training incidents pruned as the policy's `[retention]` says) and audit anchors (the signed audit head
exported as `[audit] anchor_seconds` says; see server/audit.py).

Invariants:
- A prune deletes at most `batch_rows` rows per transaction and pauses between batches, so no write lock is held
  for long: ingestion, the rollout tick and the dashboard keep going while a large backlog drains. It works at
  most PRUNE_DUTY of the time (each pause at least nine times the batch it follows): a batch is CPU and disk the
  coordinator's readers wait for, and a backlog of a day drains in minutes either way.
- What the store's PRUNABLE tables keep (live rollouts' releases, running trainings) is never deleted; the audit
  trail and the privacy ledger are not touched.
- Every prune that deleted anything writes one audit entry (`retention.prune`) with the count per table and the
  cutoffs; a dry run changes nothing and writes nothing.
- An anchor never writes to the database (an audit entry about it would move the head it signs).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server import audit
from server.loop.alerts import post_signed
from server.policy import Policy, Retention, Webhook
from server.rollout.driver import ACTIVE_PHASES
from server.store import Store, now_ms
from server.store.audit import AuditRecords
from server.store.retention import PRUNABLE, RetentionRecords

__all__ = ["ANCHORS_DIR", "Housekeeper", "PruneReport", "export_anchor", "prune"]

logger = logging.getLogger(__name__)

ANCHORS_DIR = "audit-anchors"  # in the data directory
DAY_MS = 86_400_000


@dataclass(frozen=True)
class PruneReport:
    dry_run: bool
    cutoffs: dict[str, int]  # table -> rows that arrived before this time (ms) go; absent: kept forever
    counts: dict[str, int]  # table -> rows deleted (dry run: that would be)
    batches: int = 0
    protected_releases: list[str] = field(default_factory=list)
    audit_seq: int | None = None  # the prune's audit entry

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "cutoffs": self.cutoffs,
            "counts": self.counts,
            "total": sum(self.counts.values()),
            "batches": self.batches,
            "protected_releases": self.protected_releases,
            "audit_seq": self.audit_seq,
        }


PRUNE_DUTY = 0.1  # the most of its time a prune works; the rest it pauses


def _cutoffs(retention: Retention, now: int) -> dict[str, int]:
    days = {"telemetry": retention.telemetry_days, "events": retention.events_days}
    days["fl_incidents"] = retention.incidents_days
    assert set(days) == set(PRUNABLE)
    return {table: now - int(d * DAY_MS) for table, d in days.items() if d > 0}


def prune(
    store: Store,
    retention: Retention,
    now: int | None = None,
    dry_run: bool = False,
    pause_seconds: float = 0.05,
    actor: str = "coordinator",
    stop: threading.Event | None = None,
    duty: float = PRUNE_DUTY,
) -> PruneReport:
    """Delete (or with `dry_run` count) what the retention settings let go, `retention.batch_rows` rows per
    transaction, pausing between batches at least `pause_seconds` and long enough that pruning takes at most
    `duty` of the time; audits the counts when anything went. `stop` ends it early (the rows deleted so far are
    audited)."""
    now = now_ms() if now is None else now
    records = RetentionRecords(store, ACTIVE_PHASES)
    cutoffs = _cutoffs(retention, now)
    protected = records.protected_releases()
    if dry_run:
        counts = {t: records.count_expired(t, c) for t, c in cutoffs.items()}
        return PruneReport(True, cutoffs, counts, 0, protected)
    counts = {t: 0 for t in cutoffs}
    batches = 0
    for table, cutoff in cutoffs.items():
        after = 0
        while not (stop is not None and stop.is_set()):
            began = time.monotonic()
            ids = records.next_batch(table, cutoff, after, retention.batch_rows)
            if not ids:
                break
            counts[table] += records.delete(table, ids, cutoff)
            batches += 1
            after = ids[-1]
            if len(ids) < retention.batch_rows:
                break
            worked = time.monotonic() - began
            time.sleep(max(pause_seconds, worked * (1 - duty) / duty))  # let the others have the lock and the CPU
    seq = None
    if any(counts.values()):
        detail = {"deleted": counts, "cutoffs": cutoffs, "batches": batches, "kept_releases": protected}
        seq = audit.append(store, "retention.prune", ",".join(t for t, n in counts.items() if n), detail, actor)
        logger.info("retention pruned %s in %d batch(es)", counts, batches)
    return PruneReport(False, cutoffs, counts, batches, protected, seq)


def export_anchor(
    store: Store, keys_dir: Path, anchors_dir: Path, out: Path | None = None
) -> tuple[dict[str, Any], Path]:
    """Sign the audit head and write it to `out`, or to anchors_dir/anchor-<seq>.json and anchors_dir/latest.json."""
    doc = audit.anchor(store, audit.anchor_key(keys_dir))
    if out is not None:
        return doc, audit.write_anchor(doc, out)
    path = audit.write_anchor(doc, anchors_dir / f"anchor-{doc['seq']:010d}.json")
    audit.write_anchor(doc, anchors_dir / "latest.json")
    return doc, path


def _post_anchor(hook: Webhook, doc: dict[str, Any], timeout: float) -> str:
    body = json.dumps({"event": "audit.anchor", "anchor": doc, "sent_at": now_ms()}, sort_keys=True).encode()
    return post_signed(hook, body, "audit.anchor", timeout)[0]


class Housekeeper:
    """serve's housekeeping thread, on its own database connection: a prune every `retention.interval_seconds`
    (the first one interval after start), an anchor at start and then every `audit_anchor_seconds` when the head
    moved. An anchor goes to every webhook that wants all events (no `events` list); one attempt each, the file
    being the copy that stays."""

    def __init__(
        self,
        open_store: Callable[[], Store],
        policy: Policy,
        keys_dir: Path,
        anchors_dir: Path,
        pause_seconds: float = 0.05,
        webhook_timeout: float = 5.0,
    ) -> None:
        self._open_store = open_store
        self.retention = policy.retention
        self.anchor_seconds = policy.audit_anchor_seconds
        self.webhooks: Sequence[Webhook] = [h for h in policy.webhooks if not h.events]
        self.keys_dir = keys_dir
        self.anchors_dir = anchors_dir
        self.pause_seconds = pause_seconds
        self.webhook_timeout = webhook_timeout
        self.last_prune: PruneReport | None = None
        self._last_anchored: tuple[int, str] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="housekeeper", daemon=True)

    def start(self) -> Housekeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        store = self._open_store()
        next_prune = time.monotonic() + self.retention.interval_seconds
        next_anchor = time.monotonic()
        try:
            while not self._stop.wait(0.5):
                now = time.monotonic()
                try:
                    if self.anchor_seconds > 0 and now >= next_anchor:
                        self.anchor(store)
                        next_anchor = now + self.anchor_seconds
                    if now >= next_prune:
                        self.last_prune = prune(
                            store, self.retention, pause_seconds=self.pause_seconds, stop=self._stop
                        )
                        next_prune = time.monotonic() + self.retention.interval_seconds
                except Exception:
                    logger.exception("housekeeping failed; retrying at the next interval")
                    next_prune = max(next_prune, now + self.retention.interval_seconds)
                    next_anchor = max(next_anchor, now + self.anchor_seconds)
        finally:
            store.close()

    def anchor(self, store: Store) -> Path | None:
        """Export the head if it moved since the last export; returns the file written (None: nothing new)."""
        head = AuditRecords(store).head()
        if head is not None and head == self._last_anchored:
            return None
        doc, path = export_anchor(store, self.keys_dir, self.anchors_dir)
        self._last_anchored = (doc["seq"], doc["hash"])
        for hook in self.webhooks:
            result = _post_anchor(hook, doc, self.webhook_timeout)
            if not result.startswith("HTTP 2"):
                logger.warning("audit anchor to %s: %s (the file %s has it)", hook.url, result, path)
        return path
