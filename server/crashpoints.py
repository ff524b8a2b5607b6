"""Named points where tests kill the coordinator (SIGKILL, no cleanup) to prove every step is crash-safe.

Set FEDFLEET_CRASH_AT to one name, e.g. `rollout.advance:assigned`; the first time the coordinator reaches that
point it kills itself. Unset (always, outside tests), `crash_point` is one dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import signal

__all__ = ["ENV", "crash_point"]

ENV = "FEDFLEET_CRASH_AT"
logger = logging.getLogger(__name__)


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        logger.warning("crash point %s reached: killing this process", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
