"""Signed per-device assignments (the director's "device D runs target T"), verified without I/O.

The coordinator signs the serialized `Assignment` bytes with Ed25519; the agent trusts a set of director public
keys from its enrollment bundle. `verify_assignment` is pure: it takes bytes and trust, returns the decoded
assignment or raises `AssignmentError` with a reason code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import DecodeError

from edge_agent.contract import LIMITS
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.keys import director_key_id
from edge_agent.contract.reasons import Reason
from edge_agent.errors import AssignmentError

__all__ = ["VerifiedAssignment", "load_director_keys", "parse_signed", "verify_assignment"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def load_director_keys(hex_keys: Mapping[str, str]) -> dict[str, Ed25519PublicKey]:
    """Trusted director keys from {key_id: raw public key hex}; each id must match its key."""
    keys: dict[str, Ed25519PublicKey] = {}
    for key_id, hex_key in hex_keys.items():
        try:
            raw = bytes.fromhex(hex_key)
            key = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError as e:
            raise AssignmentError(f"director key {key_id} is not an Ed25519 public key", Reason.TRUST_INVALID) from e
        if director_key_id(raw) != key_id:
            raise AssignmentError(f"director key id {key_id} does not match its key", Reason.TRUST_INVALID)
        keys[key_id] = key
    if not keys:
        raise AssignmentError("no trusted director keys", Reason.TRUST_INVALID)
    return keys


@dataclass(frozen=True)
class VerifiedAssignment:
    device_id: str
    target_path: str
    target_length: int
    target_sha256: str
    counter: int
    release_id: str
    rollout_id: str
    issued_at_ms: int
    signed: bytes  # the SignedAssignment as received, kept to resume after a restart


def parse_signed(payload: bytes) -> pb.SignedAssignment:
    if len(payload) > LIMITS.mqtt_control_payload:
        raise AssignmentError(f"assignment of {len(payload)} bytes exceeds the limit", Reason.ASSIGNMENT_TOO_LARGE)
    signed = pb.SignedAssignment()
    try:
        signed.ParseFromString(payload)
    except DecodeError as e:
        raise AssignmentError("assignment is not a valid SignedAssignment message", Reason.ASSIGNMENT_MALFORMED) from e
    return signed


def verify_assignment(
    payload: bytes,
    trusted: Mapping[str, Ed25519PublicKey],
    device_id: str,
) -> VerifiedAssignment:
    """Check signature, key and addressee. The counter is the caller's to compare (it holds the history)."""
    signed = parse_signed(payload)
    key = trusted.get(signed.key_id)
    if key is None:
        raise AssignmentError(f"assignment signed by unknown key {signed.key_id[:16]!r}", Reason.ASSIGNMENT_UNKNOWN_KEY)
    try:
        key.verify(signed.signature, signed.assignment)
    except InvalidSignature as e:
        raise AssignmentError("assignment signature does not verify", Reason.ASSIGNMENT_BAD_SIGNATURE) from e
    a = pb.Assignment()
    try:
        a.ParseFromString(signed.assignment)
    except DecodeError as e:
        raise AssignmentError("signed assignment body is malformed", Reason.ASSIGNMENT_MALFORMED) from e
    if a.device_id != device_id:
        raise AssignmentError(
            f"assignment is for device {a.device_id!r}, not {device_id!r}", Reason.ASSIGNMENT_WRONG_DEVICE
        )
    if not a.target_path or not _SHA256.match(a.target_sha256) or a.target_length <= 0 or a.counter <= 0:
        raise AssignmentError("assignment lacks a target path, sha256, length or counter", Reason.ASSIGNMENT_MALFORMED)
    return VerifiedAssignment(
        device_id=a.device_id,
        target_path=a.target_path,
        target_length=a.target_length,
        target_sha256=a.target_sha256,
        counter=a.counter,
        release_id=a.release_id,
        rollout_id=a.rollout_id,
        issued_at_ms=a.issued_at_ms,
        signed=payload,
    )
