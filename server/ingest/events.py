"""Checking what devices say (status and update events) before anything is stored. No I/O but the store lookup."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from google.protobuf.message import DecodeError

from edge_agent.contract import LIMITS, device_id_is_valid
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from server.store import Store

__all__ = ["EventRejected", "event_row", "event_rows", "parse_events", "parse_status"]

M = TypeVar("M", pb.UpdateEvent, pb.DeviceStatus)

_KINDS = {v: k.removeprefix("EVENT_KIND_").lower() for k, v in pb.EventKind.items() if v != 0}
_STATES = {v: k.removeprefix("UPDATE_STATE_").lower() for k, v in pb.UpdateState.items()}


class EventRejected(ValueError):
    """A device message that must not be stored; the text says why."""


def _check_sender(claimed: str, topic_device: str | None, store: Store) -> None:
    if not device_id_is_valid(claimed):
        raise EventRejected(f"device_id {claimed[:40]!r} is not a valid id")
    if topic_device is not None and claimed != topic_device:
        raise EventRejected(f"payload names device {claimed!r} but was sent on {topic_device!r}'s topic")
    if not store.is_device(claimed):
        raise EventRejected(f"device {claimed!r} has not registered")


def event_row(e: pb.UpdateEvent, topic_device: str | None, store: Store) -> dict[str, Any]:
    _check_sender(e.device_id, topic_device, store)
    if e.kind not in _KINDS:
        raise EventRejected(f"unknown event kind {e.kind}")
    if len(e.reason) > 64 or len(e.detail) > 1000 or len(e.target_path) > 512 or len(e.release_id) > 256:
        raise EventRejected("event fields exceed their size limits")
    return {
        "device_id": e.device_id,
        "counter": e.counter,
        "release_id": e.release_id,
        "target_path": e.target_path,
        "kind": _KINDS[e.kind],
        "reason": e.reason,
        "detail": e.detail,
        "device_time": e.timestamp_ms,
    }


def event_rows(events: Iterable[pb.UpdateEvent], topic_device: str | None, store: Store) -> list[dict[str, Any]]:
    """The rows of these events and of the events each carries in `later` (in order), all checked; at most
    LIMITS.events_per_report in all, and `later` only one level deep."""
    flat: list[pb.UpdateEvent] = []
    for e in events:
        flat.append(e)
        for later in e.later:
            if later.later:
                raise EventRejected("an event's later events carry later events of their own")
            if later.device_id != e.device_id:
                raise EventRejected(f"an event of {e.device_id[:40]!r} carries one of {later.device_id[:40]!r}")
            flat.append(later)
        if len(flat) > LIMITS.events_per_report:
            raise EventRejected(f"more than {LIMITS.events_per_report} events in one report")
    return [event_row(e, topic_device, store) for e in flat]


def parse_events(payload: bytes, topic_device: str, store: Store) -> list[dict[str, Any]]:
    """One message on a device's events topic: an event and the events that followed it."""
    return event_rows([_parse(pb.UpdateEvent(), payload)], topic_device, store)


def parse_status(payload: bytes, topic_device: str, store: Store) -> dict[str, Any]:
    s = _parse(pb.DeviceStatus(), payload)
    _check_sender(s.device_id, topic_device, store)
    if len(s.running_target) > 512 or len(s.running_release) > 256 or len(s.last_error) > 1000:
        raise EventRejected("status fields exceed their size limits")
    return {
        "device_id": s.device_id,
        "online": s.online,
        "running_release": s.running_release,
        "running_target": s.running_target,
        "running_counter": s.running_counter,
        "update_state": _STATES.get(s.update_state, "unspecified"),
        "last_error": s.last_error,
        "stale": s.stale,
        "fresh_until": s.fresh_until_ms,
    }


def _parse(message: M, payload: bytes) -> M:
    if len(payload) > LIMITS.mqtt_control_payload:
        raise EventRejected(f"payload of {len(payload)} bytes exceeds {LIMITS.mqtt_control_payload}")
    try:
        message.ParseFromString(payload)
    except DecodeError as e:
        raise EventRejected(f"not a valid {type(message).__name__} message") from e
    return message
