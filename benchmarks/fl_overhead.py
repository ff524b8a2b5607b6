"""What fedfleet's training costs over a bare Flower app, and what differential privacy costs.

Three runs in one process, on the same 10 simulated devices, data split, model, seeds and rounds, all in
Flower's simulation engine with one CPU per virtual client:

  bare      a plain Flower app: FedAvg from flwr.serverapp.strategy, a ClientApp that trains, no ledger
  fedfleet  `fedfleet train --no-dp`'s code path: ledger-aware selection, incidents, registry, drift reference
  dp        `fedfleet train`'s code path with Opacus DP-SGD (noise multiplier 1.0, clipping 1.0)

A round's time is the interval between two successive end-of-round evaluations (the same centralized
evaluation in every run), so it covers sending, local training, replies and aggregation. The first round is
left out (Ray's workers import torch then). Targets: fedfleet / bare <= 1.10; dp / fedfleet <= 2.0.
The last line is one JSON object: seconds (fedfleet), floor_seconds (bare Flower), ratio, dp_seconds, dp_ratio.

    .venv/bin/python benchmarks/fl_overhead.py [--rounds 20] [--devices 10]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from server.datadir import DataDir
from server.fl.client_app import client_seed
from server.fl.data import DigitsPartition, held_out
from server.fl.model import evaluate, initial_weights, train_plain
from server.fl.plan import TrainPlan
from server.fl.training import run_training, simulated_device_ids


def bare_flower(plan: TrainPlan) -> list[float]:
    """Round times of a plain Flower app doing the same local training and the same evaluation."""
    stamps: list[float] = []
    x_test, y_test = held_out(plan.seed)
    ids = simulated_device_ids(plan.clients)
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        x, y = DigitsPartition(partition, plan.clients, plan.alpha, plan.seed).load()
        config = msg.content["config"]
        assert isinstance(config, ConfigRecord)
        seed = client_seed(plan.seed, int(config["server-round"]), ids[partition])  # type: ignore[arg-type]
        arrays = msg.content["arrays"]
        assert isinstance(arrays, ArrayRecord)
        result = train_plain(arrays.to_numpy_ndarrays(), x, y, plan.local_epochs, plan.batch_size, plan.lr, seed)
        metrics = MetricRecord({"num-examples": result.examples, "train-loss": result.loss})
        return Message(
            RecordDict({"arrays": ArrayRecord(numpy_ndarrays=result.weights), "metrics": metrics}), reply_to=msg
        )

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        def centralized(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            loss, accuracy = evaluate(arrays.to_numpy_ndarrays(), x_test, y_test)
            stamps.append(time.monotonic())
            return MetricRecord({"accuracy": accuracy, "loss": loss})

        strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=plan.clients, min_train_nodes=plan.clients)
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(numpy_ndarrays=initial_weights(plan.seed)),
            num_rounds=plan.rounds,
            evaluate_fn=centralized,
        )

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"include_dashboard": False}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(server_app=server, client_app=client, num_supernodes=plan.clients, backend_config=backend)  # type: ignore[arg-type]
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
    logging.getLogger("flwr").setLevel(logging.ERROR)
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
