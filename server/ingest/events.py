"""Checking what devices say (status and update events) before anything is stored. No I/O but the store lookup."""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf.message import DecodeError

from edge_agent.contract import LIMITS, device_id_is_valid
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from server.store import Store

__all__ = ["EventRejected", "event_row", "parse_event", "parse_status"]

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


def parse_event(payload: bytes, topic_device: str, store: Store) -> dict[str, Any]:
    return event_row(_parse(pb.UpdateEvent(), payload), topic_device, store)


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
