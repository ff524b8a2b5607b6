"""Every machine-readable reason code an agent reports (update events' `reason`, `fedfleet-agent status`'s
last_reason), defined once. The coordinator stores them as they come; tests and operators match on them."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Reason"]


class Reason(StrEnum):
    # generic, by error family
    AGENT_ERROR = "agent_error"  # an error of the agent's with no more specific code
    CONFIG_INVALID = "config_invalid"  # agent.toml cannot be used as written
    REFUSED = "refused"  # an update refused for a security reason, no more specific code
    TRANSIENT = "transient"  # could not complete for now (network, coordinator); retried
    # the assignment (Uptane's director side)
    ASSIGNMENT_INVALID = "assignment_invalid"
    ASSIGNMENT_TOO_LARGE = "assignment_too_large"
    ASSIGNMENT_MALFORMED = "assignment_malformed"
    ASSIGNMENT_UNKNOWN_KEY = "assignment_unknown_key"  # signed by a director key the device does not trust
    ASSIGNMENT_BAD_SIGNATURE = "assignment_bad_signature"
    ASSIGNMENT_WRONG_DEVICE = "assignment_wrong_device"
    ASSIGNMENT_REPLAY = "assignment_replay"  # a counter not above the last accepted one
    ASSIGNMENT_COUNTER_JUMP = "assignment_counter_jump"  # a counter far beyond the last: it would freeze the device
    ASSIGNMENT_SUPERSEDED = "assignment_superseded"  # below a fresh statement's counter: a newer one exists
    ASSIGNMENT_UNCONFIRMED = "assignment_unconfirmed"  # above the director's current statement: it does not know it
    FRESHNESS_INVALID = "freshness_invalid"  # a freshness statement that is malformed, mis-signed or not ours
    FRESHNESS_EXPIRED = "freshness_expired"  # no unexpired freshness statement: the device is stale
    TRUST_INVALID = "trust_invalid"  # the trusted director keys themselves are unusable
    ALREADY_RUNNING = "already_running"  # committed without work: the device runs this target already
    # the TUF metadata and target (the image repository's side)
    METADATA_EXPIRED = "metadata_expired"
    METADATA_BAD_SIGNATURE = "metadata_bad_signature"
    ROOT_ROTATION_INVALID = "root_rotation_invalid"
    METADATA_MISMATCH = "metadata_mismatch"  # versions or hashes that do not agree (mix-and-match, rollback)
    METADATA_TOO_LARGE = "metadata_too_large"  # endless data
    METADATA_INVALID = "metadata_invalid"
    TARGET_UNKNOWN = "target_unknown"  # not in the signed targets metadata, or without a sha256
    TARGET_TOO_LARGE = "target_too_large"
    TARGET_MISMATCH = "target_mismatch"  # the assignment and the signed target disagree
    TARGET_LENGTH_MISMATCH = "target_length_mismatch"
    TARGET_HASH_MISMATCH = "target_hash_mismatch"
    # the model on the device
    NO_MODEL = "no_model"  # nothing committed yet to infer with
    INTERPRETER_MISSING = "interpreter_missing"
    INTERPRETER_FAILED = "interpreter_failed"
    LOAD_FAILED = "load_failed"
    PROBE_FAILED = "probe_failed"  # the new model's probe outputs differ: the previous model stays
    # the coordinator's answers
    NOT_FOUND = "not_found"
    UNIMPLEMENTED = "unimplemented"
    COORDINATOR_REFUSED = "coordinator_refused"
