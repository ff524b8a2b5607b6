"""Alerts that reach people: stored with a state (open, acknowledged, resolved), listed by `fedfleet alerts`, shown
on the dashboard, counted on /metrics, and POSTed to the policy's webhooks.

Invariants:
- One alert that is not resolved per key (a fleet's drift, a rollout's hold, ...): raising it again while it is
  live changes nothing, so a condition that lasts alerts once.
- Opening or resolving an alert queues its webhook deliveries in the same transaction: a coordinator killed right
  after the change still delivers them after its restart (a delivery may then be made twice; receivers dedupe
  on the X-Fedfleet-Delivery id).
- Deliveries are made by `WebhookSender` in threads of their own; the tick never waits for an endpoint. The queue
  is bounded: past `max_pending` the oldest pending deliveries are marked dropped, logged and counted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from server import audit
from server.loop.kinds import AlertKind, AlertState
from server.policy import Webhook
from server.store import Store, now_ms
from server.store.loop import AlertRecords, DeliveryRecords

__all__ = ["SIGNATURE_HEADER", "Alerts", "WebhookSender", "post_signed", "sign"]

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Fedfleet-Signature"  # "sha256=" + hex HMAC-SHA256 of the body under the webhook's secret


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post_signed(
    hook: Webhook, body: bytes, event: str, timeout: float, headers: dict[str, str] | None = None
) -> tuple[str, bool]:
    """POST a JSON body to a webhook, signed with its secret: what happened ("HTTP 204", "URLError: …") and
    whether a 2xx answered. One attempt; the callers decide about retries."""
    request = urllib.request.Request(
        hook.url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "fedfleet-coordinator",
            "X-Fedfleet-Event": event,
            **(headers or {}),
            SIGNATURE_HEADER: sign(hook.secret, body),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return f"HTTP {response.status}", 200 <= response.status < 300
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}", False
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        return f"{type(e).__name__}: {getattr(e, 'reason', e)}", False


class Alerts:
    """Raise, acknowledge and resolve alerts over one store; each change queues the webhooks that want it."""

    def __init__(self, store: Store, webhooks: Sequence[Webhook] = ()) -> None:
        self.store = store
        self.records = AlertRecords(store)
        self.deliveries = DeliveryRecords(store)
        self.webhooks = tuple(webhooks)

    def raise_alert(
        self, kind: AlertKind, subject: str, key: str, summary: str, detail: dict[str, Any] | None = None
    ) -> int | None:
        """Open an alert unless one with this key is live; returns the new alert's id (None: already live)."""
        with self.store.transaction():
            if self.records.live(key) is not None:
                return None
            alert_id = self.records.insert(str(kind), subject, key, summary, detail or {})
            self._queue(alert_id, str(kind), "alert.opened")
        logger.warning("alert %d (%s) %s: %s", alert_id, kind, subject, summary)
        return alert_id

    def resolve(self, key: str, why: str) -> int | None:
        """Resolve the live alert with this key, if any; returns its id."""
        with self.store.transaction():
            live = self.records.live(key)
            if live is None or not self.records.set_state(live["id"], str(AlertState.RESOLVED)):
                return None
            self._queue(live["id"], live["kind"], "alert.resolved")
        logger.info("alert %d (%s) resolved: %s", live["id"], live["kind"], why)
        return int(live["id"])

    def resolve_all_but(self, prefix: str, keep: set[str], why: str) -> list[int]:
        """Resolve every live alert whose key starts with `prefix` and is not in `keep`."""
        return [i for key in self.records.live_keys(prefix) if key not in keep if (i := self.resolve(key, why))]

    def acknowledge(self, alert_id: int, actor: str) -> dict[str, Any]:
        with self.store.transaction():
            alert = self.records.get(alert_id)
            if not self.records.set_state(alert_id, str(AlertState.ACKNOWLEDGED), actor):
                return alert  # acknowledged or resolved already: nothing to do
            audit.append(self.store, "alert.acknowledge", str(alert_id), {"kind": alert["kind"]}, actor)
        return self.records.get(alert_id)

    def _queue(self, alert_id: int, kind: str, event: str) -> None:
        for hook in self.webhooks:
            if hook.wants(kind):
                self.deliveries.enqueue(alert_id, event, hook.url)


@dataclass(frozen=True)
class _Attempt:
    delivery: dict[str, Any]
    hook: Webhook
    number: int  # 1 for the first attempt


class WebhookSender:
    """Delivers pending alert deliveries: a signed JSON POST each, retried with exponential backoff and full
    jitter, every attempt recorded. Runs in threads with their own database connection.

    One endpoint gets one delivery at a time, oldest first, so it sees an alert opened before it resolved and
    alerts in the order they were raised; a slow, hanging or failing endpoint holds up only its own deliveries."""

    def __init__(
        self,
        open_store: Callable[[], Store],
        webhooks: Sequence[Webhook],
        timeout: float = 5.0,
        backoff_seconds: float = 1.0,
        max_backoff_seconds: float = 60.0,
        max_pending: int = 1000,
        workers: int = 4,
    ) -> None:
        self._open_store = open_store
        self.webhooks = {h.url: h for h in webhooks}
        self.timeout = timeout
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.max_pending = max_pending
        self.dropped = 0
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="webhook")
        self._thread = threading.Thread(target=self._run, name="webhook-sender", daemon=True)
        self._lock = threading.Lock()
        self._in_flight: dict[int, str] = {}  # delivery id -> its endpoint's URL
        self._retries: list[tuple[float, _Attempt]] = []  # (due monotonic time, attempt)

    def start(self) -> WebhookSender:
        self._thread.start()  # also without webhooks: deliveries queued for endpoints since removed are closed
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        store = self._open_store()
        try:
            while not self._stop.wait(0.2):
                try:
                    self._dispatch(store)
                except Exception:
                    logger.exception("webhook sender: dispatching failed; retrying")
        finally:
            store.close()

    def _dispatch(self, store: Store) -> None:
        records = DeliveryRecords(store)
        if records.pending_count() > self.max_pending:
            dropped = records.drop_oldest(self.max_pending)
            self.dropped += dropped
            logger.warning("webhook queue full: dropped the %d oldest pending deliveries", dropped)
        now = time.monotonic()
        with self._lock:
            due = [a for t, a in self._retries if t <= now]
            self._retries = [(t, a) for t, a in self._retries if t > now]
            waiting = [a for _, a in self._retries] + due
            busy = set(self._in_flight) | {a.delivery["id"] for a in waiting}
            held = set(self._in_flight.values()) | {a.hook.url for a in waiting}  # endpoints with one under way
        fresh: list[_Attempt] = []
        for d in records.pending(self.max_pending):  # oldest first
            if d["url"] not in self.webhooks:  # queued before the policy dropped this endpoint
                records.attempted(d["id"], "failed", "the webhook is no longer in the policy")
            elif d["id"] not in busy and d["url"] not in held:
                fresh.append(_Attempt(d, self.webhooks[d["url"]], d["attempts"] + 1))
                held.add(d["url"])  # its next delivery waits until this one is done
        for attempt in [*due, *fresh]:
            with self._lock:
                self._in_flight[attempt.delivery["id"]] = attempt.hook.url
            future = self._pool.submit(self._attempt, attempt)
            future.add_done_callback(self._finished(attempt))

    def _finished(self, attempt: _Attempt) -> Callable[[Future[None]], None]:
        def done(future: Future[None]) -> None:
            with self._lock:
                self._in_flight.pop(attempt.delivery["id"], None)
            if not future.cancelled() and future.exception() is not None:
                logger.error("webhook delivery %d crashed: %s", attempt.delivery["id"], future.exception())

        return done

    def _attempt(self, attempt: _Attempt) -> None:
        delivery, hook = attempt.delivery, attempt.hook
        store = self._open_store()
        try:
            alert = AlertRecords(store).get(delivery["alert_id"])
            body = json.dumps(
                {"delivery": delivery["id"], "event": delivery["event"], "alert": alert, "sent_at": now_ms()},
                sort_keys=True,
                default=str,
            ).encode()
            result, ok = post_signed(
                hook, body, delivery["event"], self.timeout, {"X-Fedfleet-Delivery": str(delivery["id"])}
            )
            if ok:
                DeliveryRecords(store).attempted(delivery["id"], "delivered", result)
                return
            if attempt.number >= hook.max_attempts:
                DeliveryRecords(store).attempted(delivery["id"], "failed", result)
                logger.warning(
                    "webhook %s: delivery %d failed %d times (%s)", hook.url, delivery["id"], attempt.number, result
                )
                return
            DeliveryRecords(store).attempted(delivery["id"], "pending", result)
            delay = random.uniform(0, min(self.max_backoff_seconds, self.backoff_seconds * 2 ** (attempt.number - 1)))
            with self._lock:
                retry = _Attempt({**delivery, "attempts": attempt.number}, hook, attempt.number + 1)
                self._retries.append((time.monotonic() + delay, retry))
        finally:
            store.close()
