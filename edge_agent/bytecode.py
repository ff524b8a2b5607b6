"""The agent's bytecode, compiled ahead for the systemd unit: `python -OO -m edge_agent.bytecode`.

The unit runs the agent with -OO (PYTHONOPTIMIZE=2: no docstrings, about 3 MB less resident; the agent and
python-tuf check with errors, never with asserts) and its bytecode in PYTHONPYCACHEPREFIX, a directory that
install.sh fills as root and the agent cannot write. Run with that prefix, this imports what a running agent
imports, at start and later, so that the agent compiles nothing itself: a module it compiles costs the
compilation's memory and time at every start. A module missing from `AGENT_MODULES` still works; it is compiled
in memory each time the agent imports it.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["AGENT_MODULES", "compile_agent"]

AGENT_MODULES = (
    "edge_agent.cli",
    "edge_agent.agent",
    "edge_agent.tuf_client",  # on the first update
    # What the libraries import when first used:
    "grpc._channel",  # the first channel
    "concurrent.futures.thread",  # asyncio.to_thread's executor
    "encodings.idna",  # a host name resolved
    "_strptime",  # a timestamp parsed
    "tuf.api.serialization.json",  # TUF metadata parsed
    "fractions",  # a monitoring budget ([telemetry] noise)
)


def compile_agent() -> str:
    """Import the agent's modules, compiling what the bytecode cache lacks; returns the TFLite interpreter's name
    (whose import is compiled too)."""
    for name in AGENT_MODULES:
        importlib.import_module(name)
    from edge_agent.runtime import interpreter_name

    return interpreter_name()


if __name__ == "__main__":
    if sys.flags.optimize != 2:
        sys.exit("edge_agent.bytecode: run it as the unit runs the agent, with python -OO")
    sys.stdout.write(f"   interpreter: {compile_agent()}\n")
