"""Benchmark: the engine's evaluations/s alone and beside a CPU-bound neighbour, by torch thread count.

Run from the repository root::

    python -m bench.bench_contention            # digits CNN and SqueezeNet 1.1, ~5 min on a 2-core CPU
    python -m bench.bench_contention --quick    # the digits CNN, short windows (< ~60 s): checks that it works

A worker shares its node with other work. This measures what a neighbour
costs: each configuration runs in a fresh process (torch reads its threading
environment once, when it loads) that times the engine (:meth:`NeuronGame.evaluate`
on passes as TMAB builds them, ``bench.bench_engine.tmab_pass``) alone, then
with a competing process that spins on one core (pinned there with
``os.sched_setaffinity``), alternately, ``--rounds`` times each, keeping each
condition's best window (the machine may be shared: the best window is the
one least disturbed by others). Configurations: 1 and 2 torch threads and the
service's default (``worker.threads``: ``NEURONSHAP_THREADS`` unset), each
with OpenMP's default wait policy and with ``OMP_WAIT_POLICY=PASSIVE``
(waiting threads sleep instead of spinning). Printed: evaluations/s alone and
busy, the slowdown alone/busy against the target (no worse than 2.5x), each
configuration's rates against the default's, the load average and thread counts.

Models: the digits CNN (``bench.bench_estimator.build_model``: trained, the
whole test split, batch 64, the service's default batch) and SqueezeNet 1.1
(``tests.harness.zoo``, seeded random weights) on random images.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bench.bench_engine import code_line, engine_step, random_images, rate, tmab_pass
from bench.bench_estimator import FULL as ESTIMATOR_FULL
from bench.bench_estimator import QUICK as ESTIMATOR_QUICK
from bench.bench_estimator import _load, build_model, machine_lines, out, section, table
from examples.digits import load_digits_split
from tests.harness.zoo import randomized
from worker.process import prepare_process
from worker.shapley import MetricSpec, NeuronGame, load_data, load_model
from worker.threads import allowed_cores, default_threads

TARGET = 2.5  # busy no worse than this many times slower than alone (issue 14, item 5)
ROOT = Path(__file__).resolve().parents[1]
# A neighbour that keeps one core busy: pinned to the core given, it spins until killed.
BUSY = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"
POLICIES = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


@dataclass(frozen=True)
class Scale:
    name: str
    epochs: int
    squeezenet_size: int
    squeezenet_batch: int
    seconds: float  # each timed window
    rounds: int  # alone/busy alternations per configuration
    threads: str  # thread counts set, beside the default
    squeezenet: bool


FULL = Scale("full", ESTIMATOR_FULL.epochs, 112, 8, seconds=3.0, rounds=2, threads="1,2", squeezenet=True)
QUICK = Scale("quick", ESTIMATOR_QUICK.epochs, 32, 2, seconds=0.3, rounds=1, threads="2", squeezenet=False)


@dataclass(frozen=True)
class Job:
    """What a child process measures: a model file, its data, the batch, and its thread count (None: default)."""

    model: str
    data: str
    batch: int
    threads: int | None
    seconds: float
    rounds: int
    busy_core: int


# --------------------------------------------------------------------------- the child: one configuration


def measure(job: Job) -> dict:
    """Evaluations/s alone and beside the spinning neighbour, best window of each; runs in its own process."""
    threads = prepare_process(job.threads)  # as a job runs
    game = NeuronGame(load_model(job.model), load_data(job.data), MetricSpec("accuracy"), batch_size=job.batch)
    step = engine_step(game, tmab_pass(game))
    alone, busy, loads = [], [], []
    for _ in range(job.rounds):
        alone.append(rate(step, job.seconds))
        neighbour = subprocess.Popen([sys.executable, "-c", BUSY, str(job.busy_core)])
        try:
            time.sleep(0.3)  # it is running and pinned
            busy.append(rate(step, job.seconds))
            loads.append(_load())
        finally:
            neighbour.kill()
            neighbour.wait()
    return {
        "alone": max(alone),
        "busy": max(busy),
        "threads": threads.intra_op,
        "interop": threads.interop,
        "torch": torch.get_num_threads(),
        "load": loads[-1],
    }


def run_child(job: Job, policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NEURONSHAP_THREADS", "OMP_WAIT_POLICY")}
    result = subprocess.run(
        [sys.executable, "-m", "bench.bench_contention", "--child", json.dumps(job.__dict__)],
        cwd=ROOT,
        env=env | POLICIES[policy],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"configuration {job} ({policy}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


# --------------------------------------------------------------------------- the parent: models and the table


def prepare(scale: Scale, folder: Path) -> dict[str, tuple[Path, Path, int]]:
    """Model file, data file and batch of each model."""
    digits = build_model("digits", replace(ESTIMATOR_FULL, epochs=scale.epochs), load_digits_split(), folder)
    models = {f"{digits.label}, batch 64": (folder / "digits.pt2", folder / "digits_eval.npz", 64)}
    if scale.squeezenet:
        images = random_images(4 * scale.squeezenet_batch, scale.squeezenet_size, 1000)
        data = folder / "squeezenet_eval.npz"
        np.savez(data, inputs=images.inputs.numpy(), labels=images.labels.numpy())
        label = f"SqueezeNet 1.1, {scale.squeezenet_size} px, batch {scale.squeezenet_batch}"
        models[label] = (randomized("squeezenet", folder / "squeezenet.onnx"), data, scale.squeezenet_batch)
    return models


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny scale: checks that the benchmark still runs")
    parser.add_argument("--threads", help="comma-separated thread counts beside the default (default 1,2; quick 2)")
    parser.add_argument("--seconds", type=float, help="each timed window (default 3; quick 0.3)")
    parser.add_argument("--rounds", type=int, help="alone/busy alternations per configuration (default 2)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one configuration, run in a process of its own
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Job(**json.loads(args.child)))))
        return
    scale = QUICK if args.quick else FULL
    scale = replace(
        scale,
        seconds=args.seconds or scale.seconds,
        rounds=args.rounds or scale.rounds,
        threads=args.threads or scale.threads,
    )
    counts = [int(t) for t in scale.threads.split(",") if t]
    cores = allowed_cores()
    busy_core = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    started = time.monotonic()

    section(f"Contention benchmark ({scale.name} scale)")
    for line in [*machine_lines(), code_line()]:
        out(line)
    out(
        f"cores this process may run on: {cores}; the service's default: {default_threads(cores)} threads "
        f"(worker.threads.default_threads); the neighbour spins on core {busy_core}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        models = prepare(scale, Path(tmp))
        for label, (model, data, batch) in models.items():
            section(f"Evaluations per second alone and busy: {label}")
            results = {}
            for policy in POLICIES:
                for threads in [*counts, None]:
                    job = Job(str(model), str(data), batch, threads, scale.seconds, scale.rounds, busy_core)
                    results[(policy, threads)] = run_child(job, policy)
            default = results[("default", None)]
            rows = []
            for (policy, threads), r in results.items():
                slowdown = r["alone"] / r["busy"]
                rows.append(
                    [
                        f"{r['threads']} ({'default' if threads is None else 'set'})",
                        r["interop"],
                        "PASSIVE" if policy == "passive" else "default",
                        r["alone"],
                        r["busy"],
                        f"{slowdown:.2f}x",
                        "yes" if slowdown <= TARGET else "NO",
                        f"{r['alone'] / default['alone']:.2f}x",
                        f"{r['busy'] / default['busy']:.2f}x",
                        r["load"],
                    ]
                )
            table(
                [
                    "torch threads",
                    "inter-op",
                    "OMP_WAIT_POLICY",
                    "alone evals/s",
                    "busy evals/s",
                    "alone / busy",
                    f"<= {TARGET}x",
                    "alone vs default",
                    "busy vs default",
                    "load average (busy)",
                ],
                rows,
            )
            out(
                f"best of {scale.rounds} window(s) of {scale.seconds:g} s per condition; 'busy': a process spinning "
                f"on core {busy_core}; 'vs default': this row's rate over the service default's (first row with "
                "'default'), same condition"
            )
    out(f"total wall time {time.monotonic() - started:.0f} s; load average at the end: {_load()}")


if __name__ == "__main__":
    main(sys.argv[1:])
