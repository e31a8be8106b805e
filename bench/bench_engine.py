"""Benchmark: the evaluation engine on the ONNX Model Zoo's deep branching graphs, against a plain forward.

Run from the repository root::

    python -m bench.bench_engine             # the nine zoo networks and two profiles, ~10-15 min on a 2-core CPU
    python -m bench.bench_engine --quick     # SqueezeNet at 32 px (< ~60 s): checks that the script works

Everything printed is measured in the one run. Each network of the onnx
wheel's model zoo (``tests.harness.zoo``: the shipped graph with seeded random
weights) runs at the lowest resolution its graph allows (the fully
convolutional ones end in a global pooling and take smaller images; the others
fix 224 px through a pooling window or a reshape) on a small batch of random
images. Three evaluations/s:

* **engine**: :meth:`NeuronGame.evaluate` on passes as TMAB builds them (the
  library's pass size and lanes, each lane a run of consecutive steps of its
  own permutation walk): the prefix cache, grouped evaluation and deferred
  gates, whichever the load-time checks kept;
* **plain**: the same converted graph with its gates and no prefix cache, one
  coalition per forward, on the same masks (what one would write without the
  engine);
* **onnxruntime**: the file's own forward (batch freed, no masks) per
  coalition: a speed reference for the graph, not a competitor (it cannot
  remove neurons).

Then one pass of the engine is profiled on two networks: torch.profiler's ops
by self time, and cProfile's split of the pass between the engine's Python
(the interpreter that walks the graph node by node, grouping, gates) and the
ops it calls. The thread count is the service's (``worker.threads``), the
same for torch and onnxruntime. Timings on a shared machine are noisy: the
load average is printed beside every network.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from bench.bench_estimator import _load, machine_lines, out, section, table
from tests.harness.zoo import MODELS, randomized
from worker.process import prepare_process
from worker.shapley import MetricSpec, NeuronGame, TMABConfig, load_model
from worker.shapley.data import EvalData
from worker.shapley.game import Sample

SIZES = (32, 64, 96, 112, 128, 160, 224)  # image sizes tried, smallest first
LABELS = {
    "bvlc_alexnet": "AlexNet",
    "densenet121": "DenseNet-121",
    "inception_v1": "Inception v1",
    "inception_v2": "Inception v2",
    "resnet50": "ResNet-50",
    "shufflenet": "ShuffleNet",
    "squeezenet": "SqueezeNet 1.1",
    "vgg19": "VGG-19",
    "zfnet512": "ZFNet-512",
}


@dataclass(frozen=True)
class Scale:
    name: str
    models: tuple[str, ...]
    batch: int
    seconds: float  # least time each rate is measured for (at least one pass or forward)
    max_size: int | None  # cap on the image size (quick: the smallest only)
    profile: tuple[str, ...]


FULL = Scale("full", tuple(MODELS), batch=4, seconds=6.0, max_size=None, profile=("squeezenet", "resnet50"))
QUICK = Scale("quick", ("squeezenet",), batch=2, seconds=0.3, max_size=32, profile=("squeezenet",))


# --------------------------------------------------------------------------- models


@dataclass
class Zoo:
    """One zoo network, loaded and made a game, with its file for onnxruntime."""

    name: str
    path: Path
    size: int
    game: NeuronGame
    build_s: float


def code_line() -> str:
    """Which code ran: the commit, and the engine's files changed since (a shared working tree runs others' edits)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "worker/shapley"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return "code: unknown (no git)"
    dirty = [line[3:] for line in changed.stdout.splitlines() if line.strip()]
    commit = head.stdout.strip() or "unknown"
    return f"code: commit {commit}; engine files changed since: {', '.join(dirty) or 'none'}"


def smallest_size(gm: torch.fx.GraphModule, cap: int | None = None) -> int:
    """The smallest of :data:`SIZES` at which the graph gives class scores (fx prints a failing call's frame to
    stderr: silenced, that size is just not taken)."""
    for size in SIZES:
        if cap is not None and size > cap:
            break
        try:
            with torch.inference_mode(), contextlib.redirect_stderr(io.StringIO()):
                scores = gm(torch.zeros(2, 3, size, size))
            if scores.ndim == 2 and scores.shape[0] == 2:
                return size
        except Exception:  # torch's error, or the converter's ModelError naming the size the graph fixes
            continue
    raise RuntimeError(f"the graph takes none of the sizes {SIZES} (up to {cap})")


def random_images(n: int, size: int, classes: int, seed: int = 0) -> EvalData:
    g = torch.Generator().manual_seed(seed)
    return EvalData(torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g))


def zoo_game(name: str, folder: Path, batch: int, cap: int | None = None, **options) -> Zoo:
    """The network as a game of all its hidden channels, at its smallest size, on 2 batches of random images."""
    path = randomized(name, folder / f"{name}.onnx")
    gm = load_model(path)
    size = smallest_size(gm, cap)
    t = time.perf_counter()
    game = NeuronGame(gm, random_images(2 * batch, size, 1000), MetricSpec("accuracy"), batch_size=batch, **options)
    return Zoo(name, path, size, game, time.perf_counter() - t)


# --------------------------------------------------------------------------- passes


@dataclass
class Pass:
    """A pass as TMAB builds one: ``lanes`` walks, each a run of consecutive steps of its own permutation."""

    sample: Sample
    masks: torch.Tensor  # [M, n] bool
    lanes: torch.Tensor  # [M]


def tmab_pass(game: NeuronGame, seed: int = 0) -> Pass:
    """The library's pass size (as the game's memory bound allows) split between its lanes, each lane's steps
    1, 2, … of its permutation: the start of a walk, where truncation makes most of the evaluations."""
    base = TMABConfig()
    per_pass = max(1, min(base.coalitions_per_pass, game.max_coalitions_per_pass))
    lanes = min(base.lanes, per_pass)
    gen = torch.Generator().manual_seed(seed)
    n = game.n_players
    sample = game.sample(gen, lanes)
    masks, ids = [], []
    for lane in range(lanes):
        count = per_pass // lanes + (1 if lane < per_pass % lanes else 0)
        rank = torch.empty(n, dtype=torch.long)
        rank[torch.randperm(n, generator=gen)] = torch.arange(n)
        masks.append(rank.unsqueeze(0) >= torch.arange(1, count + 1).unsqueeze(1))
        ids.append(torch.full((count,), lane))
    return Pass(sample, torch.cat(masks), torch.cat(ids))


def rate(step: Callable[[], int], seconds: float) -> float:
    """Work per second of ``step`` (which returns the work it did), after one untimed call, over at least
    ``seconds`` and at least one call."""
    step()
    done, start = 0, time.perf_counter()
    while True:
        done += step()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def cpu_rates(steps: dict[str, Callable[[], int]], seconds: float, rounds: int = 3) -> dict[str, float]:
    """Work per CPU second of this process of each step, measured in ``rounds`` interleaved slices of at least
    ``seconds / rounds`` each (after one untimed call of each). CPU time, not wall time, and interleaved: on a
    shared box a neighbour's load comes and goes, and a rate measured in wall time while it ran, beside another
    measured after it stopped, gave ratios off by up to 1.7x (ResNet-50: 1.58x, 1.97x and 2.76x in three runs).
    With one torch thread (and one onnxruntime thread) CPU time is the work the step needed."""
    for step in steps.values():
        step()
    done = dict.fromkeys(steps, 0)
    used = dict.fromkeys(steps, 0.0)
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.process_time()
            while True:
                done[name] += step()
                elapsed = time.process_time() - start
                if elapsed >= seconds / rounds:
                    used[name] += elapsed
                    break
    return {name: done[name] / used[name] for name in steps}


def engine_step(game: NeuronGame, p: Pass) -> Callable[[], int]:
    def step() -> int:
        game.evaluate(p.sample, p.masks, p.lanes)
        return len(p.masks)

    return step


def plain_step(plain: NeuronGame, p: Pass) -> Callable[[], int]:
    """One forward per coalition of the pass, through the gated graph without prefix cache or grouping."""
    state = {"next": 0}

    def step() -> int:
        m = state["next"] % len(p.masks)
        state["next"] += 1
        plain.evaluate(p.sample, p.masks[m : m + 1], p.lanes[m : m + 1])
        return 1

    return step


def batch_free(path: Path) -> bytes:
    """The file with its batch (and image size) left open: symbolic input and output dimensions, and the
    reshapes that spell the batch as 1 (the zoo's opset-9 files) given 0, "copy the input's dimension"."""
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Reshape" and node.input[1] in inits:
            shape = numpy_helper.to_array(inits[node.input[1]]).copy()
            if shape.size and shape[0] == 1:
                shape[0] = 0
                inits[node.input[1]].CopyFrom(numpy_helper.from_array(shape, node.input[1]))
    for value in (graph.input[0], *graph.output):
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            dim.ClearField("dim_value")
            dim.dim_param = f"{value.name}_{i}"
    del graph.value_info[:]
    return model.SerializeToString()


def onnxruntime_step(path: Path, batch: int, size: int, threads: int) -> tuple[Callable[[], int], str]:
    """One forward of the file per call, batch ``batch``; (step, how it ran)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    try:
        session = onnxruntime.InferenceSession(batch_free(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        session.run(None, {name: x})
        how = f"batch {batch}"

        def step() -> int:
            session.run(None, {name: x})
            return 1

    except Exception:  # a graph whose batch cannot be freed this way: the file's batch of 1, once per image
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        how = f"{batch} x batch 1"

        def step() -> int:
            for i in range(batch):
                session.run(None, {name: x[i : i + 1]})
            return 1

    return step, how


# --------------------------------------------------------------------------- the table


def engine_table(scale: Scale, folder: Path, threads: int) -> None:
    rows = []
    for name in scale.models:
        zoo = zoo_game(name, folder, scale.batch, scale.max_size)
        game = zoo.game
        p = tmab_pass(game)
        t = time.perf_counter()
        plain = NeuronGame(
            load_model(zoo.path),  # the converted graph again: a game keeps only its split model
            random_images(2 * scale.batch, zoo.size, 1000),
            MetricSpec("accuracy"),
            batch_size=scale.batch,
            cache_prefix=False,
            grouped=False,
        )
        plain_build = time.perf_counter() - t
        # The same batches (tmab_pass draws them first, from the same seed) through the plain game's own prefix.
        q = Pass(plain.sample(torch.Generator().manual_seed(0), int(p.lanes.max()) + 1), p.masks, p.lanes)
        load = _load()
        ort, how = onnxruntime_step(zoo.path, scale.batch, zoo.size, threads)
        rates = cpu_rates({"engine": engine_step(game, p), "plain": plain_step(plain, q), "ort": ort}, scale.seconds)
        engine, plain_rate, ort_rate = rates["engine"], rates["plain"], rates["ort"]
        d = game.describe()
        engine_kind = "deferred" if d["deferred_gates"] else "grouped" if d["grouped_evaluation"] else "plain suffix"
        rows.append(
            [
                LABELS[name],
                f"{zoo.size} px",
                game.n_players,
                len(p.masks),
                engine_kind,
                engine,
                plain_rate,
                ort_rate,
                f"{engine / plain_rate:.2f}x",
                f"{engine / ort_rate:.2f}x",
                f"{zoo.build_s:.1f} / {plain_build:.1f}",
                how,
                load,
            ]
        )
        out(f"  {LABELS[name]}: done (load average {load})")
        del zoo, game, plain
    out()
    table(
        [
            "network",
            "images",
            "neurons",
            "coalitions/pass",
            "engine ran",
            "engine evals/s",
            "plain evals/s",
            "onnxruntime fwd/s",
            "engine / plain",
            "engine / onnxruntime",
            "build s (engine / plain)",
            "onnxruntime ran",
            "load average",
        ],
        rows,
    )
    out(
        f"batch {scale.batch} random images per coalition; {threads} torch and onnxruntime threads; each rate per "
        f"CPU second of this process, over >= {scale.seconds:g} CPU s in three slices interleaved with the others', "
        "after one untimed call. Target (issue 14, item 4): engine >= 2x plain on each."
    )


# --------------------------------------------------------------------------- profiles


PHASES = {  # cProfile's cumulative time of these engine functions, as shares of the pass
    "grouped interpreter: the whole suffix": ("grouped.py", "evaluate"),
    "gates settled (splits, masks applied)": ("grouped.py", "_settle"),
    "group splits (torch.unique over masks)": ("grouped.py", "_split"),
    "rows expanded per group (index_select)": ("grouped.py", "expand"),
    "deferred linear (per-neuron contributions)": ("grouped.py", "_linear"),
    "metric on the outputs": ("metrics.py", "__call__"),
}


def profile(name: str, scale: Scale, folder: Path) -> None:
    zoo = zoo_game(name, folder, scale.batch, scale.max_size)
    game = zoo.game
    p = tmab_pass(game)
    step = engine_step(game, p)
    step()
    t = time.perf_counter()
    step()
    pass_s = time.perf_counter() - t
    t = time.perf_counter()
    game.sample(torch.Generator().manual_seed(1), TMABConfig().lanes)
    prefix_s = time.perf_counter() - t
    out(
        f"{LABELS[name]} at {zoo.size} px, batch {scale.batch}, {len(p.masks)} coalitions per pass: one pass "
        f"{pass_s * 1e3:.1f} ms; the round's prefix ({TMABConfig().lanes} lanes' batches, once per round) "
        f"{prefix_s * 1e3:.1f} ms"
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total_ops = sum(e.self_cpu_time_total for e in events)
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    table(
        ["op (torch.profiler, one pass)", "calls", "self ms", "share of op time"],
        [
            [e.key, e.count, e.self_cpu_time_total / 1e3, f"{100 * e.self_cpu_time_total / max(1, total_ops):.1f}%"]
            for e in ops
        ],
    )
    profiler = cProfile.Profile()
    t = time.perf_counter()
    profiler.enable()
    step()
    profiler.disable()
    wall = time.perf_counter() - t
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = []
    for label, (file, func) in PHASES.items():
        cum = sum(v[3] for (f, _, fn), v in stats.items() if f.endswith(file) and fn == func)
        rows.append([label, cum * 1e3, f"{100 * cum / wall:.1f}%"])
    builtin = sum(v[2] for (f, _, _), v in stats.items() if f == "~")  # C functions: torch ops and the like
    python = sum(v[2] for (f, _, _), v in stats.items() if f != "~")
    rows.append(["time inside C functions (torch ops)", builtin * 1e3, f"{100 * builtin / wall:.1f}%"])
    rows.append(["time in Python code itself (interpreter, fx, engine)", python * 1e3, f"{100 * python / wall:.1f}%"])
    out(f"cProfile of one pass: {wall * 1e3:.0f} ms under the profiler (its overhead inflates the Python share)")
    table(["where (cProfile, cumulative)", "ms", "share of the pass"], rows)
    top = sorted(((v[2], f"{Path(f).name}:{fn}") for (f, _, fn), v in stats.items() if f != "~"), reverse=True)[:8]
    table(["Python function (own time)", "ms"], [[where, own * 1e3] for own, where in top])


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="SqueezeNet at 32 px: checks that the benchmark runs")
    parser.add_argument("--models", help=f"comma-separated, of: {', '.join(MODELS)} (default: all)")
    parser.add_argument("--batch", type=int, help="images per coalition (default 4; quick 2)")
    parser.add_argument("--seconds", type=float, help="least time per rate (default 6; quick 0.3)")
    parser.add_argument("--profile", help="comma-separated networks to profile (default squeezenet,resnet50)")
    parser.add_argument("--threads", type=int, help="torch threads (default: the service's, worker.threads)")
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    scale = Scale(
        scale.name,
        tuple(args.models.split(",")) if args.models else scale.models,
        args.batch or scale.batch,
        args.seconds or scale.seconds,
        scale.max_size,
        tuple(x for x in (args.profile.split(",") if args.profile is not None else scale.profile) if x),
    )
    threads = prepare_process(args.threads)  # as a job runs
    started = time.monotonic()
    section(f"Engine benchmark ({scale.name} scale)")
    for line in [*machine_lines(), code_line()]:
        out(line)
    out(f"threads: {threads.intra_op} intra-op, {threads.interop} inter-op ({threads.source}, {threads.cores} cores)")
    with tempfile.TemporaryDirectory() as tmp:
        section("Evaluations per second: engine, plain forward per coalition, onnxruntime")
        engine_table(scale, Path(tmp), threads.intra_op)
        for name in scale.profile:
            section(f"Profile of one engine pass: {LABELS[name]}")
            profile(name, scale, Path(tmp))
    out(f"total wall time {time.monotonic() - started:.0f} s; load average at the end: {_load()}")


if __name__ == "__main__":
    main(sys.argv[1:])
