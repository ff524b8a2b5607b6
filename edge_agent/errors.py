"""The agent's error family. Every refusal carries a stable machine-readable reason code (contract.reasons)."""

from __future__ import annotations

from edge_agent.contract.reasons import Reason

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

    reason = Reason.AGENT_ERROR

    def __init__(self, message: str, reason: Reason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConfigError(AgentError):
    reason = Reason.CONFIG_INVALID


class UpdateRefused(AgentError):
    """An update was refused for a security reason; the previous model stays active. Not retried."""

    reason = Reason.REFUSED


class AssignmentError(UpdateRefused):
    reason = Reason.ASSIGNMENT_INVALID


class InterpreterError(AgentError):
    reason = Reason.INTERPRETER_FAILED


class TransientError(AgentError):
    """Could not complete for now (network, coordinator unavailable); the update is retried."""

    reason = Reason.TRANSIENT
