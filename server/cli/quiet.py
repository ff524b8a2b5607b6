"""Third-party noise kept off the operator's terminal unless `fedfleet --verbose` asks for it.

The libraries under the coordinator talk on stderr at import and on first use: TensorFlow and absl (oneDNN, "All
log messages before absl::InitializeLog()"), the TFLite runtime's C++ ("Created TensorFlow Lite XNNPACK delegate
for CPU"), torch's pytree deprecation warnings, Ray's FutureWarnings, Opacus' note on its secure RNG, and python-tuf's
debug lines. None of it is something an operator acts on. `quiet_third_parties()` turns it down for this process and
the processes it starts (environment variables are inherited); `native_stderr_quiet()` hides what native code writes
to file descriptor 2 during one call. `--verbose` (or FEDFLEET_VERBOSE=1) leaves everything as the libraries have it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

__all__ = ["ENV_VERBOSE", "native_stderr_quiet", "quiet_third_parties", "verbose"]

ENV_VERBOSE = "FEDFLEET_VERBOSE"

# Inherited by child processes (the demo's coordinator, training workers, Ray's workers).
_QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",  # TensorFlow / absl C++ logs (oneDNN notices, cuda probing)
    "TF_ENABLE_ONEDNN_OPTS": "0",  # and the oneDNN "custom operations are on" notice itself
    "GLOG_minloglevel": "2",
    "ABSL_MIN_LOG_LEVEL": "3",
    "GRPC_VERBOSITY": "ERROR",
    "RAY_DEDUP_LOGS": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning",  # Ray's, in its worker processes too
}

_QUIET_LOGGERS = ("tuf", "securesystemslib", "absl", "ray", "filelock", "urllib3", "matplotlib", "PIL")

_QUIET_WARNINGS = (
    # (message regex, category, module regex)
    (r".*pytree.*", Warning, r"torch\..*"),
    (r".*secure (random|RNG).*", Warning, r"opacus\..*"),
    (r".*", FutureWarning, r"ray\..*"),
    (r".*", DeprecationWarning, r"(ray|flwr|google|tensorflow|absl)\..*"),
)


def verbose() -> bool:
    return os.environ.get(ENV_VERBOSE, "") not in ("", "0")


def quiet_third_parties() -> None:
    """Turn third-party chatter down for this process and its children, unless verbose."""
    if verbose():
        return
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message, category, module in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


@contextlib.contextmanager
def native_stderr_quiet() -> Iterator[None]:
    """Hide what native code writes to fd 2 in this block (the TFLite runtime's delegate notice); Python
    exceptions still propagate. A no-op when verbose or when fd 2 cannot be duplicated."""
    if verbose():
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
