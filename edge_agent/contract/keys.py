"""How both sides name a director key: the SHA-256 of its raw Ed25519 public key, in hex."""

from __future__ import annotations

import hashlib

__all__ = ["director_key_id"]


def director_key_id(raw_public_key: bytes) -> str:
    return hashlib.sha256(raw_public_key).hexdigest()
