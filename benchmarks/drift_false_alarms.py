"""How often a healthy fleet would raise a drift alarm, by the evidence the alarm demands.

A fleet with no drift at all: its devices' inputs come from the very distribution the release's reference was
built from (64 Gaussian features, quantile bins). The pooled window's largest per-feature PSI still moves with
sampling noise, and with few samples per bin it crosses the alarm threshold by chance. This measures
P(max input PSI > threshold) over many pooled windows for each evidence level (samples per feature bin), which is
how `retrain.min_samples_per_bin`'s default was chosen (docs/adr/0006-the-loop-in-serve.md).

    python benchmarks/drift_false_alarms.py [--trials 400] [--threshold 0.25]

Last line: one JSON object {"benchmark": "drift_false_alarms", "threshold": ..., "p_false_alarm": {per_bin: p}}.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from edge_agent.contract.drift import DriftReference, WindowCounts, score_window

FEATURES, CLASSES = 64, 10


def false_alarm_rate(per_bin: int, trials: int, threshold: float, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    reference = DriftReference.from_samples(rng.normal(size=(20_000, FEATURES)), CLASSES)
    n = per_bin * reference.n_bins
    over = 0
    for _ in range(trials):
        counts = WindowCounts.empty(reference)
        logits = rng.normal(size=(n, CLASSES))
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        counts.add(reference, rng.normal(size=(n, FEATURES)), probs, np.ones(n))
        score = score_window(counts, reference, min_samples=n)
        assert score is not None
        over += score.max_psi > threshold
    return over / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--threshold", type=float, default=0.25)
    parser.add_argument("--per-bin", default="5,10,15,20,30,50", help="evidence levels, samples per feature bin")
    args = parser.parse_args()
    rates = {}
    for per_bin in (int(v) for v in args.per_bin.split(",")):
        rates[per_bin] = false_alarm_rate(per_bin, args.trials, args.threshold)
        print(f"{per_bin:4d} samples per bin: P(max PSI > {args.threshold}) = {rates[per_bin]:.4f}")
    print(
        json.dumps(
            {
                "benchmark": "drift_false_alarms",
                "threshold": args.threshold,
                "trials": args.trials,
                "p_false_alarm": rates,
            }
        )
    )


if __name__ == "__main__":
    main()
