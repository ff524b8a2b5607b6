"""The agent's error family. Every refusal carries a stable machine-readable reason code."""

from __future__ import annotations

__all__ = [
    "AgentError",
    "AssignmentError",
    "ConfigError",
    "InterpreterError",
    "TransientError",
    "UpdateRefused",
]


class AgentError(Exception):
    """Base of all errors the agent raises on purpose."""

    reason = "agent_error"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConfigError(AgentError):
    reason = "config_invalid"


class UpdateRefused(AgentError):
    """An update was refused for a security reason; the previous model stays active. Not retried."""

    reason = "refused"


class AssignmentError(UpdateRefused):
    reason = "assignment_invalid"


class InterpreterError(AgentError):
    reason = "interpreter_failed"


class TransientError(AgentError):
    """Could not complete for now (network, coordinator unavailable); the update is retried."""

    reason = "transient"
