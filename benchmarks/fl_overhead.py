"""What fedfleet's training costs over a bare Flower app, and what differential privacy costs.

Three runs, on the same 10 simulated devices, data split, model, seeds and rounds, all in Flower's simulation
engine the way `fedfleet train` runs it (server/fl/simulation_engine.py: `flwr run` against a simulation
SuperLink of the run's own, on a Ray node of its own), one CPU per virtual client:

  bare      a plain Flower app: FedAvg from flwr.serverapp.strategy, a ClientApp that trains, no ledger
  fedfleet  `fedfleet train --no-dp`'s code path: ledger-aware selection, incidents, registry, drift reference
  dp        `fedfleet train`'s code path with Opacus DP-SGD (noise multiplier 1.0, clipping 1.0)

A round's time is the interval between two successive end-of-round evaluations (the same centralized
evaluation in every run) as this process sees them: it reads each run's record of them (the bare app's file,
fedfleet's store) every 0.1 s, the same way for all three, so a mean over the rounds is off by at most
0.1 s / (rounds - 1). It covers sending, local training, replies and aggregation. The first round is left out
(Ray's workers import torch then). Targets: fedfleet / bare <= 1.10; dp / fedfleet <= 2.0.
The last line is one JSON object: seconds (fedfleet), floor_seconds (bare Flower), ratio, dp_seconds, dp_ratio.

    .venv/bin/python benchmarks/fl_overhead.py [--rounds 20] [--devices 10]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from server.datadir import DataDir
from server.fl.client_app import client_seed
from server.fl.data import DigitsPartition, held_out
from server.fl.model import evaluate, initial_weights, train_plain
from server.fl.plan import TrainPlan
from server.fl.simulation_engine import FlowerApp, run_app
from server.fl.training import run_training, simulated_device_ids

# Flower imports the bare app's components by name in its own processes; run as a script, this module is
# `fl_overhead` there (its directory is on the path they are given).
MODULE = Path(__file__).stem if __name__ == "__main__" else __name__


def _plan(context: Context) -> TrainPlan:
    return TrainPlan.from_dict(json.loads(str(context.run_config["plan"])))


bare_client = ClientApp()


@bare_client.train()
def _bare_train(msg: Message, context: Context) -> Message:
    plan = _plan(context)
    partition = int(context.node_config["partition-id"])
    x, y = DigitsPartition(partition, plan.clients, plan.alpha, plan.seed).load()
    config = msg.content["config"]
    assert isinstance(config, ConfigRecord)
    seed = client_seed(plan.seed, int(config["server-round"]), simulated_device_ids(plan.clients)[partition])  # type: ignore[arg-type]
    arrays = msg.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    result = train_plain(arrays.to_numpy_ndarrays(), x, y, plan.local_epochs, plan.batch_size, plan.lr, seed)
    metrics = MetricRecord({"num-examples": result.examples, "train-loss": result.loss})
    return Message(RecordDict({"arrays": ArrayRecord(numpy_ndarrays=result.weights), "metrics": metrics}), reply_to=msg)


bare_server = ServerApp()


@bare_server.main()
def _bare_main(grid: Grid, context: Context) -> None:
    plan = _plan(context)
    x_test, y_test = held_out(plan.seed)
    evaluations = Path(str(context.run_config["evaluations"]))

    def centralized(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        loss, accuracy = evaluate(arrays.to_numpy_ndarrays(), x_test, y_test)
        with evaluations.open("a") as f:
            f.write(f"{server_round}\n")
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=plan.clients, min_train_nodes=plan.clients)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(numpy_ndarrays=initial_weights(plan.seed)),
        num_rounds=plan.rounds,
        evaluate_fn=centralized,
    )


def bare_flower(plan: TrainPlan) -> list[float]:
    """Round times of a plain Flower app doing the same local training and the same evaluation."""
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        evaluations = Path(tmp) / "evaluations"
        evaluations.touch()

        def seen() -> bool:
            done = len(evaluations.read_text().split())
            stamps.extend(time.monotonic() for _ in range(done - len(stamps)))
            return False  # the run ends when Flower says so

        app = FlowerApp(
            f"{MODULE}:bare_server",
            f"{MODULE}:bare_client",
            {"plan": json.dumps(plan.to_dict()), "evaluations": str(evaluations)},
            name="bare-flower",
        )
        result = run_app(app, plan.clients, timeout=600 + plan.rounds * 60, while_running=seen)
    if result.failure or len(stamps) != plan.rounds + 1:
        raise SystemExit(f"bare Flower run failed ({len(stamps)} evaluations): {result.failure}")
    return [b - a for a, b in itertools.pairwise(stamps)]


def fedfleet(plan: TrainPlan) -> list[float]:
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        d, _ = DataDir.init(Path(tmp) / "data")
        # Time is measured here, not privacy: give every simulated device room for all the rounds.
        config = d.config_path.read_text().replace("epsilon_budget = 10.0", "epsilon_budget = 1000000.0")
        d.config_path.write_text(config)
        outcome = run_training(d.root, plan, on_round=lambda _: stamps.append(time.monotonic()))
    if outcome.status != "completed":
        raise SystemExit(f"fedfleet run failed: {outcome.error}")
    return [b - a for a, b in itertools.pairwise(stamps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--devices", type=int, default=10)
    args = parser.parse_args()
    if args.rounds < 2 or args.devices < 1:
        parser.error("--rounds must be at least 2 (the first round is left out) and --devices at least 1")
    plain = TrainPlan(rounds=args.rounds, clients=args.devices, noise_multiplier=None, seed=0)
    private = TrainPlan(rounds=args.rounds, clients=args.devices, noise_multiplier=1.0, seed=0)
    bare = bare_flower(plain)[1:]
    ours = fedfleet(plain)[1:]
    dp = fedfleet(private)[1:]
    b, o, p = statistics.mean(bare), statistics.mean(ours), statistics.mean(dp)
    # Flower's grid polls for replies every 0.1 s, so single rounds come in steps of ~0.1 s: compare means.
    print(f"{args.devices} devices, rounds 2..{args.rounds}, mean seconds per round")
    for label, mean, times in (
        ("bare Flower FedAvg", b, bare),
        ("fedfleet train --no-dp", o, ours),
        ("fedfleet train (Opacus DP)", p, dp),
    ):
        print(f"{label:<28}{mean:.3f} s  median {statistics.median(times):.3f} s")
    print(f"overhead ratio fedfleet/bare = {o / b:.3f} (target <= 1.10): {'met' if o / b <= 1.10 else 'NOT met'}")
    print(f"DP cost ratio dp/no-dp       = {p / o:.3f} (target <= 2.0): {'met' if p / o <= 2.0 else 'NOT met'}")
    result = {
        "benchmark": "fl_overhead",
        "devices": args.devices,
        "rounds": args.rounds,
        "seconds": round(o, 3),  # fedfleet train --no-dp, mean per round from round 2
        "floor_seconds": round(b, 3),  # bare Flower FedAvg, the same way
        "ratio": round(o / b, 3),
        "ratio_target": 1.10,
        "dp_seconds": round(p, 3),
        "dp_ratio": round(p / o, 3),
        "dp_ratio_target": 2.0,
        "met": o / b <= 1.10 and p / o <= 2.0,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
