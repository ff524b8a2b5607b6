"""The director's signed statements for one device, verified without I/O: assignments ("device D runs target T")
and freshness statements ("D's latest assignment is counter N, until T").

The coordinator signs the serialized `Assignment` bytes with Ed25519, and a `Freshness` under FRESHNESS_CONTEXT
with the same key; the agent trusts a set of director public keys from its enrollment bundle (rotated through
TUF). `verify_assignment` and `verify_freshness` are pure: they take bytes and trust, return the decoded
statement or raise `AssignmentError` with a reason code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import DecodeError

from edge_agent.contract import LIMITS
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.keys import FRESHNESS_CONTEXT, director_key_id
from edge_agent.contract.reasons import Reason
from edge_agent.errors import AssignmentError

__all__ = [
    "VerifiedAssignment",
    "VerifiedFreshness",
    "load_director_keys",
    "parse_signed",
    "verify_assignment",
    "verify_freshness",
]

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


_Statement = TypeVar("_Statement", pb.Assignment, pb.Freshness)


def _open(
    what: str,
    signed: tuple[str, bytes, bytes, bytes],  # key id, signature, body, the bytes the signature covers
    message: _Statement,
    trusted: Mapping[str, Ed25519PublicKey],
    device_id: str,
    reasons: tuple[Reason, Reason, Reason],  # bad signature, malformed body, another device's
) -> _Statement:
    """The director's signature over a statement, then its body, then its addressee: the checks both kinds share."""
    key_id, signature, body, covered = signed
    bad_signature, malformed, wrong_device = reasons
    key = trusted.get(key_id)
    if key is None:
        raise AssignmentError(f"{what} signed by unknown key {key_id[:16]!r}", Reason.ASSIGNMENT_UNKNOWN_KEY)
    try:
        key.verify(signature, covered)
    except InvalidSignature as e:
        raise AssignmentError(f"{what} signature does not verify", bad_signature) from e
    try:
        message.ParseFromString(body)
    except DecodeError as e:
        raise AssignmentError(f"signed {what} body is malformed", malformed) from e
    if message.device_id != device_id:
        raise AssignmentError(f"{what} is for device {message.device_id!r}, not {device_id!r}", wrong_device)
    return message


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
    a = _open(
        "assignment",
        (signed.key_id, signed.signature, signed.assignment, signed.assignment),
        pb.Assignment(),
        trusted,
        device_id,
        (Reason.ASSIGNMENT_BAD_SIGNATURE, Reason.ASSIGNMENT_MALFORMED, Reason.ASSIGNMENT_WRONG_DEVICE),
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


@dataclass(frozen=True)
class VerifiedFreshness:
    device_id: str
    counter: int  # the device's latest assignment counter when the statement was issued
    issued_at_ms: int
    expires_at_ms: int
    key_id: str

    def expired(self, now_ms: int) -> bool:
        return now_ms >= self.expires_at_ms


def verify_freshness(
    signed: pb.SignedFreshness,
    trusted: Mapping[str, Ed25519PublicKey],
    device_id: str,
) -> VerifiedFreshness:
    """Check a freshness statement's signature, key, addressee and times. Whether it has expired, and whether it
    is newer than the one already held, is the caller's to judge (it holds the clock and the history)."""
    if signed.ByteSize() > LIMITS.mqtt_control_payload:
        raise AssignmentError("freshness statement exceeds the size limit", Reason.FRESHNESS_INVALID)
    f = _open(
        "freshness statement",
        (signed.key_id, signed.signature, signed.freshness, FRESHNESS_CONTEXT + signed.freshness),
        pb.Freshness(),
        trusted,
        device_id,
        (Reason.FRESHNESS_INVALID,) * 3,
    )
    if f.issued_at_ms <= 0 or f.expires_at_ms <= f.issued_at_ms:
        raise AssignmentError("freshness statement lacks a valid issue time and expiry", Reason.FRESHNESS_INVALID)
    return VerifiedFreshness(f.device_id, f.counter, f.issued_at_ms, f.expires_at_ms, signed.key_id)
