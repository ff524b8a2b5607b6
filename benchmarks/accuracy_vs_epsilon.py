"""Held-out accuracy versus target ε on digits, over several seeds, through `fedfleet train`'s code path (Flower's
simulation engine, Opacus DP-SGD on every client, noise from each device's own entropy).

    .venv/bin/python benchmarks/accuracy_vs_epsilon.py --epsilon 3 --seeds 0,1,2
    .venv/bin/python benchmarks/accuracy_vs_epsilon.py --epsilon 1,3,8,none --seeds 0,1,2
    .venv/bin/python benchmarks/accuracy_vs_epsilon.py --epsilon 3 --seeds 0 --rounds 2 --devices 2   # tiny

Every run uses the training defaults (`TrainPlan`: rounds, local epochs, batch size, learning rate) unless a flag
overrides one; a seed fixes the data split, the held-out set and the initial model, not the DP noise. `none`
trains without DP: the baseline the private runs are read against. Prints one line per run, a Markdown table of
mean ± sd (sample standard deviation over the seeds) per target ε, and as its last line one JSON object with
`mean_accuracy` (and `sd_accuracy`, per-seed `accuracy`, the largest ε reached) keyed by target ε.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from server.datadir import DataDir
from server.fl.plan import ACCOUNTANTS, PlanError, TrainPlan


def _targets(text: str) -> list[float | None]:
    targets: list[float | None] = []
    for raw in text.split(","):
        item = raw.strip()
        if item == "none":
            targets.append(None)
            continue
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is neither a number nor 'none'") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"a target ε must be a finite number > 0 (got {item!r})")
        targets.append(value)
    if len(set(targets)) != len(targets):
        raise argparse.ArgumentTypeError(f"each target ε once (got {text!r})")
    return targets


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are whole numbers separated by commas (got {text!r})") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct and >= 0 (got {text!r})")
    return seeds


def _label(target: float | None) -> str:
    return "none" if target is None else f"{target:g}"


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    defaults = TrainPlan()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=_targets, default=[3.0], help="target ε, comma-separated; none: no DP")
    parser.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--devices", type=int, default=defaults.clients)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--local-epochs", type=int, default=defaults.local_epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default=defaults.accountant)
    args = parser.parse_args()
    try:
        base = replace(
            defaults,
            clients=args.devices,
            rounds=args.rounds,
            local_epochs=args.local_epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            accountant=args.accountant,
            noise_multiplier=None,
        )
    except PlanError as e:
        parser.error(str(e))

    from server.fl.training import run_training  # torch, Flower and Ray load only once the arguments are good

    accuracy: dict[str, list[float]] = {}
    reached: dict[str, float | None] = {}
    seconds: dict[str, list[float]] = {}
    for target in args.epsilon:
        label = _label(target)
        accuracy[label], seconds[label], reached[label] = [], [], None
        for seed in args.seeds:
            plan = replace(base, target_epsilon=target, seed=seed)
            with tempfile.TemporaryDirectory(prefix="fedfleet-accuracy-") as tmp:
                d, _ = DataDir.init(Path(tmp) / "data")
                # A lifetime budget no target here can reach: the benchmark measures utility, not budget refusals.
                config = d.config_path.read_text().replace("epsilon_budget = 10.0", "epsilon_budget = 1000000.0")
                d.config_path.write_text(config)
                started = time.perf_counter()
                outcome = run_training(d.root, plan)
                took = time.perf_counter() - started
            if outcome.status != "completed":
                raise SystemExit(f"target ε {label}, seed {seed}: run {outcome.status}: {outcome.error}")
            last = outcome.rounds[-1]
            accuracy[label].append(float(last["test_accuracy"]))
            seconds[label].append(took)
            if last["epsilon_max"] is not None:
                reached[label] = max(reached[label] or 0.0, float(last["epsilon_max"]))
            eps = "-" if last["epsilon_max"] is None else f"{last['epsilon_max']:.3f}"
            print(
                f"target ε {label}, seed {seed}: accuracy {last['test_accuracy']:.4f}, ε reached {eps}, {took:.0f} s",
                flush=True,
            )

    print(
        f"\n{args.devices} devices, {args.rounds} rounds of {args.local_epochs} local epoch(s), batch "
        f"{args.batch_size}, lr {args.lr:g}, {args.accountant} accountant, δ {base.delta:g}, digits non-IID "
        f"(alpha {base.alpha:g}), seeds {','.join(map(str, args.seeds))}\n"
    )
    print("| target ε | held-out accuracy, mean ± sd | per seed | ε reached (max over devices) | seconds per run |")
    print("| --- | --- | --- | --- | --- |")
    for label, values in accuracy.items():
        eps = "-" if reached[label] is None else f"{reached[label]:.2f}"
        print(
            f"| {label} | {statistics.mean(values):.3f} ± {_sd(values):.3f} | "
            f"{' / '.join(f'{v:.3f}' for v in values)} | {eps} | {statistics.mean(seconds[label]):.0f} |"
        )
    result = {
        "benchmark": "accuracy_vs_epsilon",
        "devices": args.devices,
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "accountant": args.accountant,
        "seeds": args.seeds,
        "mean_accuracy": {k: round(statistics.mean(v), 4) for k, v in accuracy.items()},
        "sd_accuracy": {k: round(_sd(v), 4) for k, v in accuracy.items()},
        "accuracy": {k: [round(a, 4) for a in v] for k, v in accuracy.items()},
        "epsilon_reached": {k: None if v is None else round(v, 4) for k, v in reached.items()},
        "seconds_per_run": {k: round(statistics.mean(v), 1) for k, v in seconds.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
