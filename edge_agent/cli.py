"""`fedfleet-agent`: run the device agent, or report its state.

Exit codes: 0 success; 1 runtime failure; 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import sys
import time
from pathlib import Path

from edge_agent import __version__
from edge_agent.config import load_config
from edge_agent.errors import AgentError, ConfigError
from edge_agent.memory import limit_malloc
from edge_agent.state import MonitoringBudget, StateStore

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedfleet-agent",
        description="fedfleet device agent: verifies, installs and runs signed TFLite releases.",
        epilog="Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("version", help="print the agent's version", description="Print the fedfleet-agent version.")
    run = sub.add_parser(
        "run",
        help="run the agent until stopped (SIGINT/SIGTERM)",
        description="Register with the coordinator, follow the device's desired state and apply signed updates.",
    )
    run.add_argument("--config", type=Path, required=True, help="agent.toml from the enrollment bundle")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    status = sub.add_parser(
        "status",
        help="show the active slot, release, counter and last error",
        description="Read the agent's local state (works while the agent runs or not); with [telemetry] noise, "
        "also the monitoring budget: ε spent on noised telemetry windows, the budget, and whether it is exhausted.",
    )
    status.add_argument("--config", type=Path, required=True, help="agent.toml from the enrollment bundle")
    status.add_argument("--json", action="store_true", help="print one JSON document")
    infer = sub.add_parser(
        "infer",
        help="run one inference through the agent's local endpoint",
        description="Send one input to the running agent's local endpoint and print the output.",
    )
    infer.add_argument("--config", type=Path, required=True, help="agent.toml from the enrollment bundle")
    source = infer.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="comma-separated numbers, e.g. 0,0.5,1,...")
    source.add_argument("--input-file", type=Path, help="a .npy file with one input")
    infer.add_argument("--json", action="store_true", help="print one JSON document")
    return parser


def _infer(config_path: Path, text: str | None, file: Path | None, as_json: bool) -> int:
    import grpc
    import numpy as np

    from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
    from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2_grpc as pb_grpc

    config = load_config(config_path)
    if config.local_endpoint == "off":
        raise ConfigError('the local endpoint is off in this config (local_endpoint = "off")')
    try:
        x = np.load(file) if file is not None else np.array([float(v) for v in str(text).split(",")])
    except (OSError, ValueError) as e:
        raise ConfigError(f"input must be comma-separated numbers or a .npy file: {e}") from e
    with grpc.insecure_channel(config.local_endpoint) as channel:
        try:
            r = pb_grpc.AgentLocalStub(channel).Infer(pb.InferRequest(input=x.ravel().tolist()), timeout=10)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise AgentError(f"no agent answers on {config.local_endpoint}; is `fedfleet-agent run` up?") from e
            raise AgentError(f"inference refused: {e.details()}") from e
    output = list(r.output)
    doc = {
        "release": r.release_id,
        "class": int(np.argmax(output)),
        "output": [round(v, 6) for v in output],
        "latency_ms": round(r.latency_ms, 3),
    }
    if as_json:
        print(json.dumps(doc))
    else:
        print(f"release {doc['release']}: class {doc['class']} ({max(output):.3f}) in {doc['latency_ms']} ms")
    return EXIT_OK


def _status(config_path: Path, as_json: bool) -> int:
    config = load_config(config_path)
    state = StateStore(config.state_dir).load()
    info = state.active_info
    doc: dict[str, object] = {
        "device_id": config.device_id,
        "fleet": config.fleet,
        "active_slot": state.active,
        "release": info.release_id if info else None,
        "target": info.target_path if info else None,
        "sha256": info.sha256 if info else None,
        "committed_counter": state.committed_counter,
        "highest_counter": state.highest_counter,
        "update_pending": state.pending is not None,
        "last_error": state.last_error or None,
        "last_reason": state.last_reason or None,
        # freshness: the newest statement the director signed for this device, and whether it has expired
        "stated_counter": state.fresh_counter,
        "fresh_until_ms": state.fresh_until_ms or None,
        "stale": state.stale or (state.fresh_until_ms > 0 and state.is_stale(int(time.time() * 1000))),
    }
    if config.dp_epsilon_per_window is not None:  # [telemetry] noise: the monitoring budget in monitoring.json
        budget = MonitoringBudget(config.state_dir / "monitoring.json", config.monitoring_budget_epsilon)
        doc |= {
            "telemetry_epsilon_per_window": config.dp_epsilon_per_window,
            "monitoring_epsilon_spent": budget.spent,
            "monitoring_budget_epsilon": budget.budget,
            "monitoring_windows": budget.windows,
            # no more noised windows until the owner raises the budget (the last one said so)
            "monitoring_exhausted": not budget.affords(config.dp_epsilon_per_window),
        }
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        width = max(len(k) for k in doc)
        for key, value in doc.items():
            print(f"{key:<{width}}  {_shown(key, value)}")
    return EXIT_OK


def _shown(key: str, value: object) -> str:
    """A status field as a person reads it: '-' for nothing, ε to six digits, *_ms times as local ISO-8601."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if key.endswith("_ms") and isinstance(value, int):
        return datetime.datetime.fromtimestamp(value / 1000).astimezone().isoformat(timespec="seconds")
    return str(value)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"fedfleet-agent {__version__}")
        return EXIT_OK
    try:
        if args.command == "status":
            return _status(args.config, args.json)
        if args.command == "infer":
            return _infer(args.config, args.input, args.input_file, args.json)
        logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        limit_malloc()  # before the agent starts its threads (edge_agent/memory.py says why)
        from edge_agent.agent import Agent

        config = load_config(args.config)

        async def _run() -> None:
            await Agent(config).run()

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_run())
        return EXIT_OK
    except ConfigError as e:
        print(f"fedfleet-agent: {e}", file=sys.stderr)
        return EXIT_USAGE
    except AgentError as e:
        print(f"fedfleet-agent: {e}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
