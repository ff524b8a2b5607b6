"""What coordinator and agent agree on besides the protobuf messages: topic names and size limits."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_TOPIC_PREFIX", "DIRECTOR_KEYS_TARGET", "LIMITS", "Limits", "Topics", "device_id_is_valid"]

DEFAULT_TOPIC_PREFIX = "fedfleet/v1"
# The TUF target holding the director keys devices must trust now: a rotated director key reaches devices
# signed by the targets role, so no device needs re-provisioning.
DIRECTOR_KEYS_TARGET = "fedfleet/director_keys.json"


@dataclass(frozen=True)
class Limits:
    """Upper bounds on every payload either side accepts. Anything larger is refused unread."""

    mqtt_control_payload: int = 16 * 1024  # desired state, status, events
    mqtt_telemetry_payload: int = 256 * 1024
    grpc_request: int = 64 * 1024
    grpc_chunk: int = 256 * 1024  # one streamed chunk of metadata or target bytes
    grpc_message: int = 512 * 1024  # channel-level cap on any message
    metadata_file: int = 2 * 1024 * 1024
    target_file: int = 512 * 1024 * 1024
    events_per_report: int = 256
    telemetry_windows_per_upload: int = 5000
    telemetry_summary_span: int = 10_000  # one outbox summary covers at most this many windows' sequence numbers
    outbox_cap: int = 100_000  # the largest outbox_cap an agent may be configured with
    grpc_upload_seconds: float = 120.0  # one telemetry upload stream must finish within this (slow clients)
    id_length: int = 128
    counter_step: int = 1_000_000  # how far one assignment's counter may jump past the last (2^64-1 would freeze)
    labels: int = 32


LIMITS = Limits()


def device_id_is_valid(device_id: str) -> bool:
    """Ids become topic levels and file names: letters, digits, '-', '_', '.', not starting with '.'."""
    return (
        0 < len(device_id) <= LIMITS.id_length
        and not device_id.startswith(".")
        and all(c.isascii() and (c.isalnum() or c in "-_.") for c in device_id)
    )


@dataclass(frozen=True)
class Topics:
    prefix: str = DEFAULT_TOPIC_PREFIX

    def desired(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/desired"

    def status(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/status"

    def events(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/events"

    def telemetry(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/telemetry"

    def ack(self, device: str) -> str:
        return f"{self.prefix}/devices/{device}/ack"

    def freshness(self, device: str) -> str:
        """Retained: the director's current freshness statement for the device (SignedFreshness)."""
        return f"{self.prefix}/devices/{device}/freshness"

    def device_of(self, topic: str, kind: str) -> str | None:
        """The device id in `{prefix}/devices/{device}/{kind}`, or None if the topic is not of that form."""
        head = f"{self.prefix}/devices/"
        tail = f"/{kind}"
        if not (topic.startswith(head) and topic.endswith(tail)):
            return None
        device = topic[len(head) : -len(tail)]
        return device if device_id_is_valid(device) else None
