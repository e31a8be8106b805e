"""Benchmark: the ONNX Model Zoo's nine classic networks, as users have them, under a fixed budget.

Run from the repository root::

    python -m bench.bench_zoo                  # all nine, ~20 min on a 2-core CPU (bench/results/zoo.txt)
    python -m bench.bench_zoo --quick          # two small networks, tiny budget: checks that the script works

For each network (the graphs the ``onnx`` wheel ships, ``tests/harness/zoo.py``):

* loads as shipped: ``load_model`` on the file exactly as the wheel ships it (yes/no, and the error);
* then on the same graph with seeded random weights (``randomized``: real numerics, not the shipped 0.02 fills),
  at the lowest square resolution the graph takes (tried upwards from 32 px; the networks whose classifier
  reshapes to a fixed size need 224), with ``--examples`` random inputs labelled by the intact model's own
  argmax, metric accuracy, every default player, the library's defaults;
* seconds to load, seconds to build the game (its load-time checks included), then ``run_tmab`` for
  ``--budget`` seconds counted from the end of the build: evaluations per second (all coalitions run),
  coalitions per pass, the pass's activation estimate (``bytes_per_row`` x batch x coalitions per pass) and
  the process's peak RSS, whole and above what it held before the estimator ran.

Each network runs in a fresh subprocess, so each peak RSS is its own. The machine may be shared: the load
average is printed at the start and the end, with torch's thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.harness.zoo import MODELS

QUICK_MODELS = ["squeezenet", "shufflenet"]
RESOLUTIONS = (32, 64, 96, 128, 160, 192, 224)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(name: str, budget: float, examples: int) -> dict:
    """One network, in this process: what the table prints."""
    import torch

    from tests.harness.zoo import randomized, shipped
    from worker.process import prepare_process
    from worker.shapley import MetricSpec, NeuronGame, TMABConfig, load_model, run_tmab
    from worker.shapley.data import EvalData

    prepare_process(None)  # as a job runs
    row: dict = {"name": name, "threads": torch.get_num_threads()}
    try:
        load_model(shipped(name))
        row["as_shipped"] = "yes"
    except Exception as exc:  # the table says why
        row["as_shipped"] = f"no: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    with tempfile.TemporaryDirectory() as tmp:
        path = randomized(name, Path(tmp) / f"{name}.onnx")
        t = time.monotonic()
        gm = load_model(path)
        row["load_s"] = time.monotonic() - t
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for res in RESOLUTIONS:
            try:
                out = gm(torch.randn(2, 3, res, res, generator=generator))
            except Exception:  # too small for this graph: try the next size
                continue
            if out.ndim == 2 and out.shape[0] == 2:
                break
        row["resolution"] = res
        x = torch.randn(examples, 3, res, res, generator=generator)
        y = torch.cat([gm(x[i : i + 16]).argmax(1) for i in range(0, examples, 16)])
    t = time.monotonic()
    game = NeuronGame(gm, EvalData(x, y), MetricSpec("accuracy"))
    row["build_s"] = time.monotonic() - t
    config = TMABConfig(max_seconds=budget)
    per_pass = min(config.coalitions_per_pass, game.max_coalitions_per_pass)
    row |= {
        "players": game.n_players,
        "grouped": game.describe()["grouped_evaluation"],
        "per_pass": per_pass,
        "estimate_mib": game.bytes_per_row * game.batch_size * per_pass / 2**20,
    }
    before = _rss()
    estimate = run_tmab(game, config)
    row |= {
        # every coalition run, those of a round the budget cut short too: the forward work done
        "evaluations": estimate.evaluations + estimate.discarded_evaluations,
        "evals_per_s": (estimate.evaluations + estimate.discarded_evaluations) / max(estimate.elapsed_s, 1e-9),
        "peak_rss_mib": _peak_rss() / 2**20,
        "pass_rss_mib": max(0, _peak_rss() - before) / 2**20,
    }
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small networks, a tiny budget")
    parser.add_argument("--models", help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--budget", type=float, help="seconds of estimation per network (default 45; quick 2)")
    parser.add_argument("--examples", type=int, help="evaluation examples (default 64; quick 16)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: one network, one JSON line
    args = parser.parse_args(argv)
    budget = args.budget or (2.0 if args.quick else 45.0)
    examples = args.examples or (16 if args.quick else 64)
    if args.one:
        print(json.dumps(measure(args.one, budget, examples)))
        return 0

    import torch

    models = args.models.split(",") if args.models else QUICK_MODELS if args.quick else MODELS
    print("Zoo benchmark: the ONNX Model Zoo's networks as shipped, random weights, a fixed budget")
    print(f"load average at the start: {_load()}; cores: {os.cpu_count()}; torch {torch.__version__}")
    print(f"{examples} examples labelled by each model's argmax, metric accuracy, defaults, {budget:g} s of estimation")
    header = (
        f"{'network':<14}{'players':>8}{'px':>5}{'load s':>8}{'build s':>9}{'evals':>7}{'evals/s':>9}"
        f"{'per pass':>10}{'pass est MiB':>14}{'pass RSS MiB':>14}{'peak RSS MiB':>14}  grouped  loads as shipped"
    )
    print(f"\n{header}", flush=True)
    threads, failed = [], False
    for name in models:  # each row as it is measured: a full run is long, and the machine may be shared
        child = [sys.executable, "-m", "bench.bench_zoo", "--one", name, "--budget", str(budget)]
        result = subprocess.run([*child, "--examples", str(examples)], capture_output=True, text=True)
        if result.returncode != 0:
            print(f"{name}: failed\n{result.stderr[-2000:]}", flush=True)
            failed = True
            continue
        r = json.loads(result.stdout.strip().splitlines()[-1])
        threads.append(r["threads"])
        print(
            f"{r['name']:<14}{r['players']:>8,}{r['resolution']:>5}{r['load_s']:>8.1f}{r['build_s']:>9.1f}"
            f"{r['evaluations']:>7}{r['evals_per_s']:>9.2f}{r['per_pass']:>10}{r['estimate_mib']:>14,.0f}"
            f"{r['pass_rss_mib']:>14,.0f}{r['peak_rss_mib']:>14,.0f}  {'yes' if r['grouped'] else 'no':<7}  "
            f"{r['as_shipped']}    (load average {_load()})",
            flush=True,
        )
    print(f"torch threads per network: {', '.join(map(str, threads))}")
    print(f"\nload average at the end: {_load()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
