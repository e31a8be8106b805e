"""Evidence for a proposed library change: a cache-sized activation budget per forward pass on CPU.

Run from the repository root::

    python -m bench.bench_pass_memory [--quick]

``NeuronGame`` caps coalitions per pass by ``memory_bytes`` (default 1 GiB on
CPU), so TMAB's default of 64 coalitions x 128 examples runs passes of ~8,000
rows whose activations (tens of MB per tensor) do not fit in the CPU caches.
This script runs the *same* TMAB run (library defaults, mode top, same seed,
same number of permutations) with several ``memory_bytes`` values and prints
the wall time. The pass size does not change which coalitions are evaluated,
so the estimates agree (checked); only the speed differs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_estimator import FULL, QUICK, build_model
from examples.digits import load_digits_split
from worker.shapley import MetricSpec, NeuronGame, TMABConfig, run_tmab

BUDGETS = [None, 64 << 20, 16 << 20, 1]  # None: the library default; 1: one coalition per pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    iterations = {"digits": 220, "wide": 200} if not args.quick else {"digits": 8, "wide": 4}
    split = load_digits_split()
    print(f"torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("digits", "wide"):
            model = build_model(kind, scale, split, Path(tmp))
            print(
                f"\n{model.label}: TMABConfig(mode='top', top_k=10, seed=2), {iterations[kind]} permutations, batch 128"
            )
            print(
                f"{'memory_bytes':>14}{'coalitions/pass':>17}{'time (s)':>10}{'rows/s':>10}{'evaluations':>13}"
                "  same estimate"
            )
            first = None
            for budget in BUDGETS:
                game = NeuronGame(model.graph, model.data, MetricSpec("accuracy"), batch_size=128, memory_bytes=budget)
                cfg = TMABConfig(mode="top", top_k=10, seed=2, max_iterations=iterations[kind])
                run_tmab(game, TMABConfig(mode="top", top_k=10, seed=99, max_iterations=4))  # warm-up
                t = time.perf_counter()
                est = run_tmab(game, cfg)
                dt = time.perf_counter() - t
                same = "-" if first is None else ("yes" if torch.allclose(est.values, first, atol=1e-12) else "NO")
                first = est.values if first is None else first
                per_pass = min(cfg.coalitions_per_pass, game.max_coalitions_per_pass)
                label = "default" if budget is None else f"{budget >> 20} MiB" if budget >= 1 << 20 else str(budget)
                print(
                    f"{label:>14}{per_pass:>17}{dt:>10.1f}{est.rows / dt:>10.0f}{est.evaluations:>13}  {same}",
                    flush=True,
                )


if __name__ == "__main__":
    main(sys.argv[1:])
