"""People and their tokens: add, rotate, revoke, and who a presented token belongs to.

A token is 32 random bytes (URL-safe text), shown once when it is issued. Only its SHA-256 is stored: with that
much entropy a hash cannot be reversed or guessed, and a sign-in finds its user by the hash (then compares in
constant time). Every lookup reads the database, so a revoked or rotated token is refused at the next request.

The operator token of earlier versions (DATA/keys/operator.token, `fedfleet dashboard-token`) is the admin user
`operator`: created with that token's hash the first time the data directory is used by this version.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

from server import audit
from server.errors import ConflictError, CoordinatorError
from server.roles import Role, permissions_of
from server.store import Store
from server.store.users import UserRecords

__all__ = ["OPERATOR", "User", "Users", "token_hash"]

OPERATOR = "operator"  # the admin user holding DATA/keys/operator.token
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def token_hash(token: str) -> str:
    return hashlib.sha256(b"fedfleet-user-token\0" + token.encode()).hexdigest()


@dataclass(frozen=True)
class User:
    name: str
    role: Role

    @property
    def permissions(self) -> list[str]:
        return permissions_of(self.role)

    @property
    def actor(self) -> str:
        """How the audit trail names what this user did through the API."""
        return f"user:{self.name}"


def _doc(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": row["name"],
        "role": row["role"],
        "created_at": row["created_at"],
        "rotated_at": row["rotated_at"],
        "revoked_at": row["revoked_at"],
        "active": row["revoked_at"] is None,
    }


def _role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise CoordinatorError(f"role {role!r} is not one of: {', '.join(r.value for r in Role)}") from None


class Users:
    """The users of one store. Each change is audited by `actor`, in the same transaction."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.records = UserRecords(store)

    def add(self, name: str, role: str, actor: str) -> tuple[dict[str, Any], str]:
        """A new user with a new token: returns (the user, the token, which is shown only now)."""
        if not _NAME.match(name):
            raise CoordinatorError(
                f"user name {name!r} must be 1-64 lowercase letters, digits, '.', '_' or '-', starting with a letter "
                "or digit"
            )
        checked = _role(role)
        token = secrets.token_urlsafe(32)
        with self.store.transaction():
            row = self.records.add(name, str(checked), token_hash(token))
            audit.append(self.store, "user.add", name, {"role": str(checked)}, actor)
        return _doc(row), token

    def get(self, name: str) -> dict[str, Any]:
        return _doc(self.records.get(name))

    def list(self) -> list[dict[str, Any]]:
        return [_doc(r) for r in self.records.all()]

    def rotate(self, name: str, actor: str) -> tuple[dict[str, Any], str]:
        """A new token for a live user; the old one is refused from the next request."""
        if self.records.get(name)["revoked_at"] is not None:
            raise CoordinatorError(f"user {name!r} is revoked; add a user with a new name instead")
        token = secrets.token_urlsafe(32)
        with self.store.transaction():
            self.records.set_token_hash(name, token_hash(token))
            audit.append(self.store, "user.rotate", name, {}, actor)
        return _doc(self.records.get(name)), token

    def revoke(self, name: str, actor: str) -> dict[str, Any]:
        with self.store.transaction():
            if not self.records.revoke(name):
                raise CoordinatorError(f"user {name!r} is already revoked")
            audit.append(self.store, "user.revoke", name, {}, actor)
        return _doc(self.records.get(name))

    def authenticate(self, token: str) -> User | None:
        """The live user holding this token, or None (unknown, rotated away or revoked)."""
        if not token:
            return None
        digest = token_hash(token)
        row = self.records.by_token_hash(digest)
        if row is None or not hmac.compare_digest(row["token_hash"], digest):
            return None
        return User(row["name"], _role(row["role"]))

    def adopt_operator(self, token: str, rotated: bool = False) -> None:
        """Make `operator` the admin user holding this token: created once (the upgrade from the single operator
        token, not audited: nothing changed hands); with `rotated` (`dashboard-token --rotate`) its hash is
        replaced and a revoked operator revived."""
        if self.records.find(OPERATOR) is None:
            with contextlib.suppress(ConflictError):  # another process adopted it first
                self.records.add(OPERATOR, str(Role.ADMIN), token_hash(token))
        elif rotated:
            self.records.set_token_hash(OPERATOR, token_hash(token), str(Role.ADMIN), revive=True)
