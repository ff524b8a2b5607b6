"""The update sequence, in one function: verify, refresh, accept, download, verify, install, probe, commit.

`apply_assignment` is blocking (network, fsync, interpreter) and runs off the agent's event loop. It never
touches the active slot; the only commit point is one atomic replace of state.json, so whatever step a crash
interrupts, the agent restarts on a committed model and, if the assignment was accepted, resumes it.

Order of checks: the director's signature, then the counter (no replay, no jump past LIMITS.counter_step, not
below the newest freshness statement held), then the target in verified TUF metadata, then the director's
current freshness statement, fetched now (`confirm_current`: the assignment must be the latest it states); only
then is the counter persisted (the assignment accepted), and only then does the download start. An assignment
that names a target the image repository does not sign, or that the director's statement does not confirm, is
refused without burning a counter; one that cannot be confirmed for now (no answer, or no unexpired statement)
waits and is retried.

Freshness statements ("your latest assignment is counter N, until T") come from Register, the periodic check and
MQTT; `accept_freshness` keeps one only if it is valid, unexpired and newer than the one held (state.py).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.assignment import (
    VerifiedAssignment,
    VerifiedFreshness,
    load_director_keys,
    parse_signed,
    verify_assignment,
    verify_freshness,
)
from edge_agent.contract import DIRECTOR_KEYS_TARGET, LIMITS
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.files import atomic_write_bytes, fsync_dir, sha256_of
from edge_agent.contract.reasons import Reason
from edge_agent.errors import AgentError, AssignmentError, InterpreterError, TransientError, UpdateRefused
from edge_agent.runtime import Model, ModelOptions, load_model
from edge_agent.state import SlotInfo, StateStore
from edge_agent.steps import STEPS
from edge_agent.transport import GrpcTransport

if TYPE_CHECKING:
    from edge_agent.tuf_client import Sources

__all__ = [
    "STEPS",
    "Outcome",
    "UpdateContext",
    "UpdateResult",
    "accept_freshness",
    "apply_assignment",
    "confirm_current",
]

logger = logging.getLogger(__name__)


class Outcome(Enum):
    COMMITTED = "committed"
    UNCHANGED = "unchanged"  # the assignment was already applied
    REJECTED = "rejected"  # refused for a security reason; previous model active, not retried
    FAILED = "failed"  # probe or interpreter failure; previous model active, not retried
    RETRY = "retry"  # transient failure; the assignment stays pending and is retried


@dataclass(frozen=True)
class UpdateResult:
    outcome: Outcome
    reason: str = ""
    detail: str = ""
    model: Model | None = None


@dataclass
class UpdateContext:
    device_id: str
    store: StateStore
    transport: GrpcTransport
    director_keys: dict[str, Ed25519PublicKey]  # updated in place when a rotated set is learned
    emit: Callable[[pb.UpdateEvent], None]
    interpreter: str | None = None
    model_options: ModelOptions | None = None  # agent.toml `xnnpack`, `share_models`; None: the defaults
    step: Callable[[str], None] = lambda name: None
    offer: Callable[[bytes], None] = lambda payload: None  # a newer assignment learned along the way (any thread)
    clock_ms: Callable[[], int] = lambda: int(time.time() * 1000)
    mirrors: tuple[str, ...] = ()  # static TUF mirrors tried before the coordinator (agent.toml `mirrors`)
    mirror_ca: Path | None = None  # verifies their certificates; None: the system's trust store

    def event(self, a: VerifiedAssignment | None, kind: int, reason: str = "", detail: str = "") -> None:
        self.emit(
            pb.UpdateEvent(
                device_id=self.device_id,
                counter=a.counter if a else 0,
                target_path=a.target_path if a else "",
                release_id=a.release_id if a else "",
                kind=kind,  # type: ignore[arg-type]
                reason=reason,
                detail=detail[:500],
                timestamp_ms=int(time.time() * 1000),
            )
        )


def apply_assignment(payload: bytes, ctx: UpdateContext) -> UpdateResult:
    store = ctx.store
    try:
        try:
            a = verify_assignment(payload, ctx.director_keys, ctx.device_id)
        except AssignmentError as e:
            if e.reason != Reason.ASSIGNMENT_UNKNOWN_KEY or not _learn_director_keys(ctx):
                raise
            a = verify_assignment(payload, ctx.director_keys, ctx.device_id)  # once more, with the rotated keys
    except AssignmentError as e:
        return _refuse(ctx, None, e)
    except TransientError as e:
        logger.warning("could not fetch rotated director keys: %s", e)
        return UpdateResult(Outcome.RETRY, e.reason, str(e))
    state = store.load()
    if a.counter < state.highest_counter:
        detail = f"assignment counter {a.counter} is below {state.highest_counter} already seen (replay or downgrade)"
        return _refuse(ctx, a, AssignmentError(detail, Reason.ASSIGNMENT_REPLAY))
    if a.counter > state.highest_counter + LIMITS.counter_step:
        detail = f"assignment counter {a.counter} jumps more than {LIMITS.counter_step} past {state.highest_counter}"
        return _refuse(ctx, a, AssignmentError(detail, Reason.ASSIGNMENT_COUNTER_JUMP))
    if a.counter == state.highest_counter and state.pending != payload.hex():
        return UpdateResult(Outcome.UNCHANGED)
    if a.counter < state.fresh_counter:
        detail = f"assignment counter {a.counter} is superseded: the director stated counter {state.fresh_counter}"
        return _refuse(ctx, a, AssignmentError(detail, Reason.ASSIGNMENT_SUPERSEDED))
    try:
        active = state.active_info
        if (
            state.active is not None
            and active is not None
            and (active.target_path, active.sha256) == (a.target_path, a.target_sha256)
        ):
            # The same target, verified when it was installed, is running (a re-issued assignment).
            confirm_current(ctx, a)
            _require_trusted_key(ctx, a)  # the statement may have taught a list that retired a's key
            running = replace(active, counter=a.counter, release_id=a.release_id)
            store.update(
                highest_counter=a.counter,
                slots={**state.slots, state.active: running},
                committed_counter=a.counter,
                pending=None,
                last_error="",
                last_reason="",
            )
            ctx.event(a, pb.EVENT_KIND_COMMITTED, Reason.ALREADY_RUNNING)
            return UpdateResult(Outcome.COMMITTED, Reason.ALREADY_RUNNING)

        # python-tuf is imported on the first update, not at start: an idle agent does not carry it.
        from edge_agent.tuf_client import download_target, refresh_and_get_targets

        sources = _sources(ctx, a)
        info, (keys_info,) = refresh_and_get_targets(
            store.tuf_dir, ctx.transport, a.target_path, DIRECTOR_KEYS_TARGET, sources=sources
        )
        if info.length != a.target_length or info.hashes.get("sha256") != a.target_sha256:
            raise UpdateRefused(
                "assignment and signed targets metadata disagree on the target's length or hash", Reason.TARGET_MISMATCH
            )
        if keys_info is not None and keys_info.hashes.get("sha256") != sha256_of(store.director_keys_path):
            _learn_director_keys(ctx)  # the signed list changed: a rotation, perhaps one that retired a key
        _require_trusted_key(ctx, a)
        ctx.step("metadata_verified")
        confirm_current(ctx, a)
        _require_trusted_key(ctx, a)  # and so may the director's statement
        state = store.update(highest_counter=a.counter, pending=payload.hex())
        ctx.step("assignment_accepted")

        slot = state.inactive
        slot_path = store.model_path(slot)
        if slot in state.slots and sha256_of(slot_path) == a.target_sha256:
            logger.info("target %s already in slot %s (hash checked); no download", a.target_path, slot)
        else:
            ctx.event(a, pb.EVENT_KIND_DOWNLOADING)
            started = False

            def progress(done: int, total: int) -> None:
                nonlocal started
                if not started:
                    started = True
                    ctx.step("download_started")

            part = download_target(info, ctx.transport, store.downloads, progress, sources)
            ctx.event(a, pb.EVENT_KIND_VERIFIED)
            ctx.step("download_verified")
            _install(part, slot_path)
            ctx.step("slot_written")
        ctx.event(a, pb.EVENT_KIND_INSTALLED)
        ctx.step("installed")

        custom = dict(info.custom) if isinstance(info.custom, dict) else {}
        model = load_model(slot_path, ctx.interpreter, ctx.model_options)
        probe = custom.get("probe")
        if probe:
            worst = model.run_probe(probe)
            logger.info("probe passed for %s (max abs diff %.3g)", a.target_path, worst)
        ctx.step("probed")

        # The commit point: one atomic write records the slot's contents and makes it active.
        slot_info = SlotInfo(a.target_path, a.target_sha256, a.target_length, a.release_id, a.counter, custom)
        store.update(
            slots={**state.slots, slot: slot_info},
            active=slot,
            committed_counter=a.counter,
            pending=None,
            last_error="",
            last_reason="",
        )
        ctx.step("switched")
        ctx.event(a, pb.EVENT_KIND_COMMITTED)
        return UpdateResult(Outcome.COMMITTED, model=model)
    except TransientError as e:
        logger.warning("update to %s paused: %s", a.target_path, e)
        store.update(last_error=str(e), last_reason=e.reason)
        ctx.event(a, pb.EVENT_KIND_FAILED, e.reason, str(e))
        return UpdateResult(Outcome.RETRY, e.reason, str(e))
    except UpdateRefused as e:
        return _refuse(ctx, a, e)
    except InterpreterError as e:
        store.update(pending=None, last_error=str(e), last_reason=e.reason)
        ctx.event(a, pb.EVENT_KIND_PROBE_FAILED, e.reason, str(e))
        logger.warning("update to %s failed: %s", a.target_path, e)
        return UpdateResult(Outcome.FAILED, e.reason, str(e))


def accept_freshness(
    ctx: UpdateContext, signed: pb.SignedFreshness, learn_keys: bool = True
) -> VerifiedFreshness | None:
    """Verify a freshness statement and keep it if it is unexpired and newer (issued later, counter no lower) than
    the one held; returns it if kept. Raises AssignmentError for a statement that is not the director's for this
    device, or whose counter jumps past LIMITS.counter_step (it would make every real assignment superseded).
    `learn_keys`: whether an unknown key id may send the agent to fetch a rotated key list through TUF (not for
    what anyone can publish on MQTT: each such statement would cost a metadata refresh)."""
    try:
        try:
            f = verify_freshness(signed, ctx.director_keys, ctx.device_id)
        except AssignmentError as e:
            if e.reason != Reason.ASSIGNMENT_UNKNOWN_KEY or not learn_keys or not _learn_director_keys(ctx):
                raise
            f = verify_freshness(signed, ctx.director_keys, ctx.device_id)
    except AssignmentError as e:
        if e.reason == Reason.ASSIGNMENT_UNKNOWN_KEY:
            raise AssignmentError(str(e), Reason.FRESHNESS_INVALID) from e
        raise
    state = ctx.store.load()
    if f.counter > state.highest_counter + LIMITS.counter_step:
        raise AssignmentError(
            f"freshness statement counter {f.counter} jumps more than {LIMITS.counter_step} past "
            f"{state.highest_counter}",
            Reason.ASSIGNMENT_COUNTER_JUMP,
        )
    if f.expired(ctx.clock_ms()):
        logger.info("ignoring an expired freshness statement (counter %d)", f.counter)
        return None
    kept = ctx.store.update_if(
        lambda s: f.issued_at_ms > s.fresh_issued_ms and f.counter >= s.fresh_counter,
        fresh_counter=f.counter,
        fresh_issued_ms=f.issued_at_ms,
        fresh_until_ms=f.expires_at_ms,
    )
    return f if kept is not None else None


def confirm_current(ctx: UpdateContext, a: VerifiedAssignment) -> None:
    """Ask the director now for its current statement; the assignment must be the latest it states. A newer
    assignment in the answer is offered (it supersedes this one). Raises AssignmentError (superseded,
    unconfirmed) or TransientError (no answer, or no unexpired statement to judge by)."""
    try:
        response = ctx.transport.check(ctx.store.load().highest_counter)
    except UpdateRefused:
        raise
    except AgentError as e:
        raise TransientError(f"cannot confirm assignment {a.counter} with the director: {e}") from e
    if response.HasField("freshness"):
        accept_freshness(ctx, response.freshness)
    if response.HasField("assignment") and (newer := response.assignment.SerializeToString()) != a.signed:
        ctx.offer(newer)
    state = ctx.store.load()
    if state.is_stale(ctx.clock_ms()):
        raise TransientError(f"no unexpired freshness statement to confirm assignment {a.counter} against")
    if a.counter < state.fresh_counter:
        raise AssignmentError(
            f"assignment counter {a.counter} is superseded: the director stated counter {state.fresh_counter}",
            Reason.ASSIGNMENT_SUPERSEDED,
        )
    if a.counter > state.fresh_counter:
        raise AssignmentError(
            f"assignment counter {a.counter} is above the director's current statement ({state.fresh_counter})",
            Reason.ASSIGNMENT_UNCONFIRMED,
        )


def _require_trusted_key(ctx: UpdateContext, a: VerifiedAssignment) -> None:
    """An assignment verified before the device learned a rotated key list must be signed by a key still on it:
    a rotation with --retire-previous drops the old key, and its assignments are refused before the counter is
    kept."""
    key_id = parse_signed(a.signed).key_id
    if key_id not in ctx.director_keys:
        raise AssignmentError(
            f"assignment signed by director key {key_id[:16]!r}, which the signed key list no longer names (retired)",
            Reason.ASSIGNMENT_UNKNOWN_KEY,
        )


_LEARNING = threading.Lock()  # the update and the freshness check may both meet a rotation: one downloads the list


def _learn_director_keys(ctx: UpdateContext) -> bool:
    """An assignment signed by a key we do not know: the director key may have been rotated. Fetch the signed
    list of director keys through TUF (root → targets → this target); keep it if it differs. Returns whether
    the trusted keys changed. A refusal of the metadata or the file leaves the keys as they were."""
    from edge_agent.tuf_client import download_target, refresh_and_get_target

    with _LEARNING:
        try:
            sources = _sources(ctx, None)
            info = refresh_and_get_target(ctx.store.tuf_dir, ctx.transport, DIRECTOR_KEYS_TARGET, sources)
            part = download_target(info, ctx.transport, ctx.store.downloads, sources=sources)
            raw = part.read_bytes()
            part.unlink()
            keys = load_director_keys(json.loads(raw))
        except (UpdateRefused, ValueError) as e:
            logger.warning("no usable rotated director keys: %s", e)
            return False
        if sha256_of(ctx.store.director_keys_path) != info.hashes.get("sha256"):
            atomic_write_bytes(ctx.store.director_keys_path, raw)  # kept even if the set is the same: not fetched again
        if set(keys) == set(ctx.director_keys):
            return False
        ctx.director_keys.update(keys)  # add, then drop: a reader in another thread never sees an empty set
        for key_id in set(ctx.director_keys) - set(keys):
            del ctx.director_keys[key_id]
    logger.info("director keys rotated: now trusting %s", ", ".join(k[:16] for k in keys))
    return True


def _sources(ctx: UpdateContext, a: VerifiedAssignment | None) -> Sources:
    """The mirrors, then the coordinator. A mirror that fails or serves what verification refuses is reported as
    a `failed` event with the usual reason (transient for the rollout: the next source is asked)."""
    from edge_agent.tuf_client import Sources

    def refused(source: str, e: AgentError) -> None:
        ctx.event(a, pb.EVENT_KIND_FAILED, e.reason, f"{source}: {e}")

    return Sources(ctx.mirrors, ctx.mirror_ca, refused)


def _refuse(ctx: UpdateContext, a: VerifiedAssignment | None, e: UpdateRefused) -> UpdateResult:
    """A security refusal: keep the active model, forget the pending update, say why."""
    changes: dict[str, object] = {"last_error": str(e), "last_reason": e.reason}
    state = ctx.store.load()
    if a is not None and state.pending is not None and a.counter == state.highest_counter:
        changes["pending"] = None  # the refused assignment was the one being applied
    ctx.store.update(**changes)
    ctx.event(a, pb.EVENT_KIND_REJECTED, e.reason, str(e))
    logger.warning("update refused (%s): %s", e.reason, e)
    return UpdateResult(Outcome.REJECTED, e.reason, str(e))


def _install(part: Path, slot_path: Path) -> None:
    """Move the verified, fsynced download into the inactive slot: one atomic rename, then fsync the slot dir."""
    os.replace(part, slot_path)
    fsync_dir(slot_path.parent)
