"""Accuracy versus ε on digits: the same 10 devices, split, seed and rounds, trained with target ε 1, 3, 8 and
without DP, through `fedfleet train`'s code path (Flower simulation engine, Opacus on every client).

    .venv/bin/python benchmarks/accuracy_vs_epsilon.py [--rounds 5] [--devices 10] [--seed 0]

Prints a Markdown table: target ε, the largest ε a client reported, final test accuracy, seconds.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from server.datadir import DataDir
from server.fl.plan import TrainPlan
from server.fl.training import run_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epsilons", default="1,3,8,none", help="comma-separated targets; 'none' = no DP")
    args = parser.parse_args()
    rows = []
    for item in args.epsilons.split(","):
        target = None if item == "none" else float(item)
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            DataDir.init(data)
            plan = TrainPlan(
                rounds=args.rounds, clients=args.devices, seed=args.seed, target_epsilon=target, noise_multiplier=None
            )
            started = time.perf_counter()
            outcome = run_training(data, plan)
            seconds = time.perf_counter() - started
        if outcome.status != "completed":
            raise SystemExit(f"target ε {item}: run {outcome.status}: {outcome.error}")
        last = outcome.rounds[-1]
        eps = "-" if last["epsilon_max"] is None else f"{last['epsilon_max']:.2f}"
        rows.append(f"| {item} | {eps} | {last['test_accuracy']:.4f} | {seconds:.0f} |")
        print(rows[-1], flush=True)
    print(f"\n{args.devices} devices, {args.rounds} rounds, seed {args.seed}, digits non-IID (alpha 0.5), δ 1e-5\n")
    print("| target ε | ε reached (max over clients) | test accuracy | seconds |")
    print("| --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
