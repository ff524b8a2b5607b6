"""Who may do what: the roles people hold and the permissions each grants, defined once.

The API checks a permission per endpoint and answers 403 without changing anything when the caller's role lacks
it; `GET /api/session` lists the caller's permissions by these names so the dashboard shows only what they may do.

| permission       | what it allows                                             | roles                              |
| ---------------- | ---------------------------------------------------------- | ---------------------------------- |
| read             | every view, list and report                                | all                                |
| rollouts.act     | pause, resume, abort, roll back a rollout                  | operator, release-manager, admin   |
| alerts.ack       | acknowledge an alert                                       | operator, release-manager, admin   |
| releases.publish | upload and sign a release                                  | release-manager, admin             |
| assign           | issue signed assignments                                   | release-manager, admin             |
| rollouts.start   | start a rollout                                            | release-manager, admin             |
| loop.answer      | approve or reject a proposed retraining                    | release-manager, admin             |
| privacy.manage   | privacy budgets, consent, ledger exports                   | privacy-officer, admin             |
| users.manage     | add, rotate and revoke users                               | admin                              |
| keys.manage      | rotate and replace keys                                    | admin                              |
| devices.manage   | enroll, label, revoke devices                              | admin                              |
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["GRANTS", "Permission", "Role", "permissions_of"]


class Permission(StrEnum):
    READ = "read"
    ROLLOUTS_ACT = "rollouts.act"
    ALERTS_ACK = "alerts.ack"
    RELEASES_PUBLISH = "releases.publish"
    ASSIGN = "assign"
    ROLLOUTS_START = "rollouts.start"
    LOOP_ANSWER = "loop.answer"
    PRIVACY_MANAGE = "privacy.manage"
    USERS_MANAGE = "users.manage"
    KEYS_MANAGE = "keys.manage"
    DEVICES_MANAGE = "devices.manage"


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    RELEASE_MANAGER = "release-manager"
    PRIVACY_OFFICER = "privacy-officer"
    ADMIN = "admin"


_OPERATE = frozenset({Permission.READ, Permission.ROLLOUTS_ACT, Permission.ALERTS_ACK})
_RELEASE = _OPERATE | {
    Permission.RELEASES_PUBLISH,
    Permission.ASSIGN,
    Permission.ROLLOUTS_START,
    Permission.LOOP_ANSWER,
}

GRANTS: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({Permission.READ}),
    Role.OPERATOR: _OPERATE,
    Role.RELEASE_MANAGER: frozenset(_RELEASE),
    Role.PRIVACY_OFFICER: frozenset({Permission.READ, Permission.PRIVACY_MANAGE}),
    Role.ADMIN: frozenset(Permission),
}


def permissions_of(role: Role | str) -> list[str]:
    """The role's permissions by name, in the order Permission lists them (an unknown role grants nothing)."""
    try:
        granted = GRANTS[Role(role)]
    except ValueError:
        return []
    return [str(p) for p in Permission if p in granted]
