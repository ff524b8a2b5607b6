"""The coordinator's error family. The CLI turns each into one sentence on stderr and a non-zero exit."""

from __future__ import annotations

__all__ = ["ConflictError", "CoordinatorError", "DataDirError", "NotFoundError", "ReleaseError"]


class CoordinatorError(Exception):
    """Base of all errors the coordinator raises on purpose."""


class DataDirError(CoordinatorError):
    """The data directory is missing, incomplete or not initialised."""


class NotFoundError(CoordinatorError):
    """A named device, release or file does not exist."""


class ConflictError(CoordinatorError):
    """The request contradicts existing state (a release version that exists with other bytes, ...)."""


class ReleaseError(CoordinatorError):
    """A model cannot be released as given."""
