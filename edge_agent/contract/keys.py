"""How both sides name a director key (the SHA-256 of its raw Ed25519 public key, in hex), and what a director
signature over a freshness statement covers."""

from __future__ import annotations

import hashlib

__all__ = ["FRESHNESS_CONTEXT", "director_key_id"]

# A freshness statement is signed over this prefix + its bytes, so no signed statement can pass for a signed
# assignment (signed over the bare Assignment bytes) or the other way round, though one key signs both.
FRESHNESS_CONTEXT = b"fedfleet/v1 freshness\n"


def director_key_id(raw_public_key: bytes) -> str:
    return hashlib.sha256(raw_public_key).hexdigest()
