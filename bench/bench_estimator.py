"""Benchmark: TMAB-Shapley against plain permutation sampling (ours), Captum's and shapiq's estimators.

Run from the repository root::

    python -m bench.bench_estimator                  # full run, ~80-100 min on a 2-core CPU
    python -m bench.bench_estimator --sections a     # section (a) alone: 21 min on a quiet box, up to ~90 under load
    python -m bench.bench_estimator --quick          # tiny scale (~2-5 min, load-dependent): checks that it works

Everything printed is measured in the one run; nothing is hard-coded. Two
models are trained on scikit-learn's digits (``examples.digits.train``),
exported with ``export_pt2`` into a temporary folder and loaded back with
``load_model``; the metric is accuracy on (a prefix of) the test split.

Sections
--------
(a) Time to a correct top-10. A long *reference* run (untruncated, mode
    ``all``) gives each neuron's value and standard error (SE). A top-10 is
    *correct* when each of its ten neurons has reference value
    >= (the reference's 10th largest value - 0.005). Plain permutation
    sampling (our estimator with truncation 0, bandit off, whole evaluation
    set each time) and TMAB with the library defaults (seeds 0-4, each to its
    own stop) are run; after every round we record whether the current top-10
    is correct, and report the first point from which it stays correct to the
    end of the run ("stable-correct"). The headline is TMAB's *certified*
    stop (stop reason "converged": what a user gets without a reference):
    plain's time to a stable-correct top-10 over TMAB's time at its stop, for
    the median and the worst seed, and whether every seed's top-10 at its stop
    is correct. A run its cap stops first is not certified (its ratio is an
    upper bound, "<"). Then the peers a user would pick (``bench/peers.py``):
    Captum's ``ShapleyValueSampling`` over a vector of neuron gates and
    shapiq's ``PermutationSamplingSV``, ``SVARM``, ``KernelSHAP`` and
    ``StratifiedSamplingSV``, on the same whole-set game, each timed until it
    first gives a correct top-10 (none has a stop rule of its own).
(b) Coalition evaluations per second: many coalitions per forward pass,
    grouped by their upstream masks (library defaults) and not grouped,
    against one per pass, with and without the prefix cache, and a few pass
    sizes around the default.
(c) Achieved FLOP/s of section (b)'s runs (FLOPs counted on the same walks)
    against a float32 matmul peak measured in the same run, beside the
    effective rate that prices every coalition at a full suffix pass.
(d) A one-at-a-time sweep around the defaults (bound, truncation, batch size,
    lanes) on the digits CNN: two seeds per configuration, each run under a
    time cap and stopped early once its top-10 has stayed correct long enough.

Clock
-----
Times in sections (a) and (d), and the peers', are CPU seconds of this
process, with torch's threads set as the service sets them
(``worker.threads``: one fewer than the cores, so one here). On this shared
2-core box a neighbour's load came and went between plain's run and TMAB's,
so wall-time ratios measured minutes apart moved with it; with one thread,
CPU time is the work each run needed. The caps (``max_seconds``) stay wall
time. The load average and the thread count are printed.

Choices for the full run (and why)
----------------------------------
* Models: ``torch.manual_seed(0)`` before building each model, so every run
  trains the same weights (the initial weights come from the global
  generator, which other work in the process would otherwise move).
* Evaluation set: the whole test split (450 examples) for both models.
* Reference: batches of random examples (32 for the digits CNN, 16 for the
  wide CNN). The variance of a marginal is dominated by the random
  permutation, not by the batch (we measured SDs of ~0.06 for the top
  neurons of the digits CNN at batch 32, 128 and 450 alike), so small batches
  buy the most permutations per second. A reference runs until the largest SE
  among its current top-20 is <= ``ref_se_target`` (0.002, less than half the
  0.005 tolerance) or its time cap, and prints its SEs. The digits CNN's
  reference takes ~1,000-1,700 permutations (~80-130 s) for that.
* The wide CNN's reference runs in mode ``all`` *with* the library's
  per-player stopping (a player stops being sampled once its SE is below the
  target; there is no truncation, so no bias). Its top neurons (the 16
  conv1 channels) have marginal SDs of ~0.1-0.17, so an SE of 0.002 takes
  several thousand permutations; with the bandit off every permutation would
  cost 1,042 coalitions instead of ~34, which does not fit in this benchmark.
  It stops at its SE target or its 180 s cap; the printed SEs say how far to
  trust borderline neurons.
* Plain sampling gets its best pass size: coalitions per pass are chosen by
  timing a few passes of each size on the whole-set game (on this CPU small
  passes can be faster than the library's default), so that it is not a
  strawman. It runs until its top-10 has been correct for
  max(``plain_confirm``, half the permutations it took) permutations, or its
  time cap. On the wide CNN one plain permutation costs 1,042 coalitions x
  450 examples and a correct top-10 needs on the order of a thousand
  permutations (the 10th and 11th neurons are close and noisy): plain gets a
  300 s cap there. If it has not got there by then we print "not reached",
  the plain/TMAB ratios become lower bounds (">": plain's time to the
  standard is more than its cap, a measured fact), and we add what plain
  would cost at the number of permutations TMAB needed (plain's measured
  cost per permutation x TMAB's permutations), labelled as an estimate.
* Plain runs a second time on TMAB's batch (the library's ``batch_size``
  random examples per permutation, the trade the reference makes too). The
  targets are against whole-set plain, the issue's baseline; the second row
  says how much of TMAB's lead the smaller batch alone would give plain.
* TMAB runs to its own stop under a cap (150 s digits, 600 s wide): five
  seeds, because its time varies several-fold between seeds and "correct at
  the certified stop in every seed" needs more than one.
* Peers run one permutation (Captum) or one doubled budget (shapiq, each run
  from scratch with a fixed seed) at a time and are checked after each, under
  a cumulative cap (240 s digits, 300 s wide). A shapiq budget is not started
  when its predicted time would pass the cap, and an approximator whose
  smallest sensible budget already would (or that cannot work at that size:
  KernelSHAP's weights overflow float64 at 1,040 players) is skipped with
  the reason printed, rather than left to hang.
* Each run has its own seed. Time caps bound every run, so a busier machine
  gives worse numbers rather than a longer benchmark. Timings on a shared
  machine are noisy: the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import NormalDist

import torch

from bench.peers import APPROXIMATORS, captum_first_correct, shapiq_first_correct, shapiq_version
from examples.digits import DigitsCNN, WideDigitsCNN, export_pt2, load_digits_split, save_eval_npz, train
from worker.process import prepare_process
from worker.shapley import MetricSpec, NeuronGame, TMABConfig, load_data, load_model, run_tmab

K = 10  # top-k
TOL = 0.005  # a returned neuron is acceptable if within TOL of the reference's k-th value
OFF = 10**9  # min_samples larger than any run: the bandit never decides a player

SEED_REF, SEED_PLAIN, SEED_TMAB, SEED_CAPTUM, SEED_THROUGHPUT, SEED_SHAPIQ = 1000, 1, 2, 3, 5, 7
DEFAULT_BATCH = inspect.signature(NeuronGame).parameters["batch_size"].default  # the library's, whatever it is


@dataclass(frozen=True)
class Scale:
    name: str
    epochs: int
    eval_examples: dict  # model kind -> examples of the test split (None: all)
    ref_batch: dict
    ref_se_target: float
    ref_min_iterations: int
    ref_seconds: dict
    plain_seconds: dict
    plain_confirm: int
    peer_seconds: dict  # each peer's cumulative cap, per model
    peer_probe_players: int  # players of the free game on which a shapiq approximator's own work is probed
    tmab_seconds: dict
    tmab_seeds: tuple
    throughput_iterations: dict
    sweep_seconds: float
    sweep_confirm: int
    sweep_seeds: tuple
    calibrate_seconds: float
    peak_size: int


FULL = Scale(
    name="full",
    epochs=30,
    eval_examples={"digits": None, "wide": None},
    ref_batch={"digits": 32, "wide": 16},
    ref_se_target=0.002,
    ref_min_iterations=100,
    ref_seconds={"digits": 150.0, "wide": 180.0},
    plain_seconds={"digits": 200.0, "wide": 300.0},
    plain_confirm=20,
    peer_seconds={"digits": 240.0, "wide": 300.0},
    peer_probe_players=128,
    tmab_seconds={"digits": 150.0, "wide": 600.0},  # wide: one thread certified after 270 CPU s (240 s capped all five)
    tmab_seeds=(0, 1, 2, 3, 4),
    throughput_iterations={"digits": 16, "wide": 1},
    sweep_seconds=40.0,
    sweep_confirm=40,
    sweep_seeds=(SEED_TMAB, SEED_TMAB + 10),
    calibrate_seconds=0.3,
    peak_size=2048,
)

QUICK = Scale(
    name="quick",
    epochs=2,
    eval_examples={"digits": 64, "wide": 16},
    ref_batch={"digits": 16, "wide": 16},
    ref_se_target=0.002,
    ref_min_iterations=4,
    ref_seconds={"digits": 2.0, "wide": 2.0},
    plain_seconds={"digits": 2.0, "wide": 2.0},
    plain_confirm=2,
    peer_seconds={"digits": 1.0, "wide": 1.0},
    peer_probe_players=16,
    tmab_seconds={"digits": 2.0, "wide": 2.0},
    tmab_seeds=(0, 1),
    throughput_iterations={"digits": 1, "wide": 1},
    sweep_seconds=1.0,
    sweep_confirm=4,
    sweep_seeds=(SEED_TMAB, SEED_TMAB + 10),
    calibrate_seconds=0.05,
    peak_size=512,
)


# --------------------------------------------------------------------------- output


def out(line: str = "") -> None:
    print(line, flush=True)


def table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    out("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    out("  ".join("-" * w for w in widths))
    for r in cells:
        out("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    out()


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def section(title: str) -> None:
    out()
    out("=" * len(title))
    out(title)
    out("=" * len(title))


def ratio(a: float | None, b: float | None, lower_bound: bool = False, upper_bound: bool = False) -> str:
    """``a / b``, marked ">" when ``a`` is only a lower bound (a run that never got there) and "<" when ``b`` is
    (a TMAB run its cap stopped before it converged); with both the ratio bounds nothing, so it is not given."""
    if a is None or b is None or b <= 0:
        return "-"
    if lower_bound and upper_bound:
        return "n/a (both capped)"
    return f"{'>' if lower_bound else '<' if upper_bound else ''}{a / b:.1f}x"


# --------------------------------------------------------------------------- machine


def machine_lines() -> list[str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import captum

        captum_version = captum.__version__
    except ImportError:
        captum_version = "not installed"
    return [
        f"CPU: {cpu}; {os.cpu_count()} logical CPUs; torch threads: {torch.get_num_threads()}",
        f"torch {torch.__version__}; captum {captum_version}; shapiq {shapiq_version() or 'not installed'}; "
        f"Python {platform.python_version()}; {platform.platform()}",
        f"load average at start: {_load()}",
    ]


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def matmul_peak(size: int) -> float:
    """Best float32 FLOP/s of ``torch.mm`` on ``size`` x ``size`` matrices."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        torch.mm(a, b)
    best = float("inf")
    reps = 5
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best


# --------------------------------------------------------------------------- models


@dataclass
class Model:
    kind: str
    label: str
    module: torch.nn.Module
    graph: torch.fx.GraphModule
    data: object  # EvalData
    accuracy: float
    train_s: float

    def game(self, batch_size: int | None = 128, cache_prefix: bool = True, grouped: bool = True) -> NeuronGame:
        """The game on this model; ``batch_size=None`` uses the whole evaluation set every time."""
        size = len(self.data) if batch_size is None else batch_size
        return NeuronGame(
            self.graph, self.data, MetricSpec("accuracy"), batch_size=size, cache_prefix=cache_prefix, grouped=grouped
        )


def build_model(kind: str, scale: Scale, split, folder: Path) -> Model:
    x_tr, y_tr, x_te, y_te = split
    cls = DigitsCNN if kind == "digits" else WideDigitsCNN
    torch.manual_seed(0)  # the initial weights come from the global generator: same model every run
    t = time.monotonic()
    module = train(cls(), x_tr, y_tr, epochs=scale.epochs)
    train_s = time.monotonic() - t
    n = scale.eval_examples[kind] or len(y_te)
    x, y = x_te[:n], y_te[:n]
    with torch.no_grad():
        accuracy = float((module(x).argmax(1) == y).float().mean())
    export_pt2(module, folder / f"{kind}.pt2", x_te[:2])
    save_eval_npz(folder / f"{kind}_eval.npz", x, y)
    graph, data = load_model(folder / f"{kind}.pt2"), load_data(folder / f"{kind}_eval.npz")
    label = f"{cls.__name__} ({'digits CNN' if kind == 'digits' else 'wide CNN'})"
    return Model(kind, label, module, graph, data, accuracy, train_s)


# --------------------------------------------------------------------------- correctness


def top_k(values: torch.Tensor) -> torch.Tensor:
    return torch.argsort(values, descending=True, stable=True)[:K]


def is_correct(values: torch.Tensor, reference: torch.Tensor) -> bool:
    cut = float(torch.sort(reference, descending=True).values[K - 1]) - TOL
    return bool((reference[top_k(values)] >= cut).all())


@dataclass
class Point:
    iterations: int
    evaluations: int
    rows: int
    seconds: float
    correct: bool


class Tracker:
    """Progress callback recording, after every round, whether the top-10 is correct.

    With ``confirm``, asks the run to stop once the top-10 has stayed correct
    for max(confirm, half the iterations it took) iterations.
    """

    def __init__(self, reference: torch.Tensor, confirm: int | None = None) -> None:
        self.started = time.process_time()  # made just before its run: the run's clock (docstring: 'Clock')
        self.reference = reference
        self.confirm = confirm
        self.points: list[Point] = []
        self._stop = False

    def __call__(self, progress) -> None:
        e = progress.estimate
        self.points.append(
            Point(e.iterations, e.evaluations, e.rows, self.seconds(), is_correct(e.values, self.reference))
        )
        if self.confirm is not None:
            s = stable_point(self.points)
            if s is not None and e.iterations >= s.iterations + max(self.confirm, s.iterations // 2):
                self._stop = True

    def should_stop(self) -> bool:
        return self._stop

    def seconds(self) -> float:
        """CPU seconds of this process since the run began."""
        return time.process_time() - self.started


def stable_point(points: list[Point], until_s: float | None = None) -> Point | None:
    """The first point from which every later point (up to ``until_s``) is correct."""
    pts = [p for p in points if until_s is None or p.seconds <= until_s]
    if not pts or not pts[-1].correct:
        return None
    i = len(pts) - 1
    while i > 0 and pts[i - 1].correct:
        i -= 1
    return pts[i]


# --------------------------------------------------------------------------- (a)


@dataclass
class Reference:
    values: torch.Tensor
    se: torch.Tensor
    iterations: int
    rows: int
    seconds: float
    stop: str
    batch: int
    bandit: bool


def reference_run(model: Model, scale: Scale) -> Reference:
    game = model.game(scale.ref_batch[model.kind])
    n = game.n_players
    bandit = model.kind == "wide"
    base = TMABConfig()
    z = NormalDist().inv_cdf(1.0 - base.delta / n / 2.0)
    cfg = TMABConfig(
        mode="all",
        truncation=0.0,
        bound="normal",
        min_samples=30 if bandit else OFF,
        half_width=z * scale.ref_se_target,  # the time-uniform interval gets there at ~0.8x the SE target
        seed=SEED_REF,
        max_seconds=scale.ref_seconds[model.kind],
    )
    done = [False]

    def progress(p) -> None:
        e = p.estimate
        if e.iterations >= scale.ref_min_iterations:
            se = e.std_errors
            near = torch.argsort(e.values, descending=True)[: 2 * K]
            done[0] = float(se[near].max()) <= scale.ref_se_target

    est = run_tmab(game, cfg, on_progress=progress, should_stop=lambda: done[0])
    reason = "SE target reached" if est.stop_reason in ("stopped", "converged") else f"time cap ({est.stop_reason})"
    return Reference(
        est.values.clone(),
        est.std_errors,
        est.iterations,
        est.rows,
        est.elapsed_s,
        reason,
        game.batch_size,
        bandit,
    )


def print_reference(model: Model, ref: Reference) -> None:
    order = torch.argsort(ref.values, descending=True)
    v = ref.values[order]
    near = order[: 2 * K]
    cut = float(v[K - 1]) - TOL
    acceptable = int((ref.values >= cut).sum())
    table(
        ["reference", "value"],
        [
            [
                "sampling",
                f"untruncated, mode all, batch {ref.batch} random examples, "
                + ("per-player stop at the SE target (no truncation)" if ref.bandit else "bandit off"),
            ],
            ["permutations", ref.iterations],
            ["forward rows", ref.rows],
            ["wall time (s)", ref.seconds],
            ["stopped by", ref.stop],
            ["max SE over its top-20", f"{float(ref.se[near].max()):.4f}"],
            ["median SE over its top-20", f"{float(ref.se[near].median()):.4f}"],
            ["10th / 11th largest value", f"{float(v[K - 1]):.4f} / {float(v[K]):.4f}"],
            ["neurons acceptable in a top-10 (>= 10th - 0.005)", acceptable],
        ],
    )
    table(
        ["rank", "neuron", "reference value", "SE"],
        [
            [r + 1, int(order[r]), f"{float(v[r]):.4f}", f"{float(ref.se[order[r]]):.4f}"]
            for r in range(min(K + 4, len(v)))
        ],
    )


@dataclass
class RunResult:
    name: str
    points: list[Point]
    iterations: int
    evaluations: int
    rows: int
    seconds: float
    stop: str
    final_correct: bool
    values: torch.Tensor | None = None

    @property
    def stable(self) -> Point | None:
        return stable_point(self.points)


def worst_pick(values: torch.Tensor | None, reference: torch.Tensor) -> str:
    """Reference rank and value of the weakest neuron of a top-10 (acceptable if the value >= the cut)."""
    if values is None:
        return "-"
    order = torch.argsort(reference, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    picked = top_k(values)
    worst = picked[torch.argmin(reference[picked])]
    return f"#{int(rank[worst]) + 1} ({float(reference[worst]):.4f})"


def fastest_pass(game: NeuronGame, seconds: float = 0.3) -> tuple[int, dict]:
    """Coalitions per pass with the most evaluations per second on this game (measured, ~``seconds`` each), on
    what a pass really holds: consecutive coalitions of a permutation walk (the grouped evaluation gains from
    their shared masks; random coalitions would hide that)."""
    sample = game.sample(torch.Generator().manual_seed(0), 1)
    limit = game.max_coalitions_per_pass
    candidates = sorted(
        {m for m in (1, 2, 4, 8, 16, 32, 64, 128) if m <= limit} | {min(limit, TMABConfig().coalitions_per_pass)}
    )
    gen = torch.Generator().manual_seed(0)
    n = game.n_players
    rates = {}
    for m in candidates:
        rank = torch.empty(n, dtype=torch.long)
        rank[torch.randperm(n, generator=gen)] = torch.arange(n)
        first = int(torch.randint(0, max(1, n - m), (1,), generator=gen))
        masks = rank.unsqueeze(0) >= torch.arange(first, first + m).unsqueeze(1)  # steps first .. first+m-1
        lanes = torch.zeros(m, dtype=torch.long)
        game.evaluate(sample, masks, lanes)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            game.evaluate(sample, masks, lanes)
            done += m
        rates[m] = done / (time.perf_counter() - start)
    return max(rates, key=rates.get), rates


def plain_run(model: Model, ref: torch.Tensor, scale: Scale, batch_size: int | None = None) -> RunResult:
    """Plain permutation sampling: no truncation, no bandit, one permutation at a time at its fastest pass size,
    on the whole set (``batch_size=None``, the issue's baseline) or on ``batch_size`` random examples per
    permutation (TMAB's batch: the same variance-for-cost trade, given to plain as well)."""
    game = model.game(batch_size)
    on = "the whole-set game" if batch_size is None else f"the batch-{game.batch_size} game"
    per_pass, rates = fastest_pass(game, scale.calibrate_seconds)
    out(
        f"plain: coalitions per pass chosen by measurement on {on}: {per_pass} "
        f"(evals/s by coalitions per pass: {', '.join(f'{m}: {r:.0f}' for m, r in rates.items())})"
    )
    cfg = TMABConfig(
        mode="top",
        top_k=K,
        truncation=0.0,
        min_samples=OFF,
        lanes=1,
        coalitions_per_pass=per_pass,
        seed=SEED_PLAIN,
        max_seconds=scale.plain_seconds[model.kind],
    )
    tracker = Tracker(ref, confirm=scale.plain_confirm)
    est = run_tmab(game, cfg, on_progress=tracker, should_stop=tracker.should_stop)
    stop = "confirmed" if est.stop_reason == "stopped" else est.stop_reason
    name = "plain permutation sampling" + ("" if batch_size is None else f", batch {game.batch_size}")
    return _result(name, tracker, est, stop, ref)


def _result(name: str, tracker: Tracker, est, stop: str, ref: torch.Tensor) -> RunResult:
    """A run as the tables read it: its tracked points, its work, why it stopped and whether its top-k is correct."""
    return RunResult(
        name,
        tracker.points,
        est.iterations,
        est.evaluations,
        est.rows,
        tracker.seconds(),
        stop,
        is_correct(est.values, ref),
        est.values,
    )


def tmab_run(
    model: Model,
    ref: torch.Tensor,
    cap_s: float,
    seed: int = SEED_TMAB,
    batch_size: int | None = DEFAULT_BATCH,
    confirm: int | None = None,
    **changes,
) -> RunResult:
    game = model.game(batch_size)
    cfg = replace(TMABConfig(mode="top", top_k=K), seed=seed, max_seconds=cap_s, **changes)
    tracker = Tracker(ref, confirm=confirm)
    est = run_tmab(game, cfg, on_progress=tracker, should_stop=tracker.should_stop)
    stop = "confirmed" if est.stop_reason == "stopped" else est.stop_reason or "-"
    return _result("TMAB (defaults)", tracker, est, stop, ref)


def time_to_correct(model: Model, scale: Scale, ref: Reference) -> dict:
    """Plain sampling's time to a correct top-10, TMAB's certified stop over several seeds, and the peers."""
    values = ref.values
    plain = plain_run(model, values, scale)
    plain_batched = plain_run(model, values, scale, DEFAULT_BATCH)
    runs = {
        seed: replace(
            tmab_run(model, values, scale.tmab_seconds[model.kind], seed=seed), name=f"TMAB (defaults), seed {seed}"
        )
        for seed in scale.tmab_seeds
    }
    cut = float(torch.sort(values, descending=True).values[K - 1]) - TOL
    out(
        f"correct = each of the ten >= {cut:.4f} (reference 10th value - {TOL}); 'weakest pick' = reference rank and "
        "value of the weakest of the ten; TMAB runs to its own stop ('converged': every chosen-unchosen pair "
        "certified within eps by the two intervals or the pair's own, which certifies each pick within "
        f"eps = {TMABConfig().epsilon} of the true 10th value) under a {scale.tmab_seconds[model.kind]:.0f} s cap"
    )
    rows = []
    for r in (plain, plain_batched, *runs.values()):
        s = r.stable
        rows.append(
            [
                r.name,
                s.iterations if s else "not reached",
                s.rows if s else None,
                s.seconds if s else None,
                r.iterations,
                r.rows,
                r.seconds,
                r.stop,
                r.final_correct,
                worst_pick(r.values, values),
            ]
        )
    table(
        [
            "method",
            "perms to stable-correct",
            "rows then",
            "CPU s then",
            "perms at stop",
            "rows at stop",
            "CPU s at stop",
            "stop",
            "top-10 at stop correct",
            "weakest pick",
        ],
        rows,
    )
    certified = _certified_lines(model, plain, plain_batched, runs)
    _stable_lines(model, scale, plain, list(runs.values()))
    peers(model, scale, values, plain, certified)
    return {"plain": plain, "tmab": runs}


def _by_time(runs: list[RunResult], key: Callable[[RunResult], float]) -> tuple[RunResult, RunResult]:
    """The median and the worst run by ``key`` (seconds, inf when it never got there)."""
    ordered = sorted(runs, key=key)
    return ordered[(len(ordered) - 1) // 2], ordered[-1]


def _plain_point(plain: RunResult) -> tuple[float, float, bool]:
    """Plain's time and rows to a stable-correct top-10, and whether they are only lower bounds (it never got
    there: its whole run is shown instead)."""
    ps = plain.stable
    return (ps.seconds, ps.rows, False) if ps else (plain.seconds, plain.rows, True)


def _certified_lines(
    model: Model, plain: RunResult, plain_batched: RunResult, by_seed: dict[int, RunResult]
) -> RunResult:
    """The headline: plain's time to a correct top-10 over TMAB's time at its own certified stop (what a user
    gets: the stop is the only point a run knows it is done); returns the median seed's run. The target is
    against whole-set plain (the issue's baseline); plain on TMAB's batch is shown beside it, for the share of
    the gain that comes from the smaller batch alone."""
    target = 3.0 if model.kind == "digits" else 5.0
    runs = list(by_seed.values())

    def at_stop(r: RunResult) -> float:
        return r.seconds if r.stop == "converged" else math.inf  # a capped run is not certified: the slowest

    median, worst = _by_time(runs, at_stop)
    lines, met = [], []
    for base_name, base, label, r in (
        ("plain", plain, "median seed", median),
        ("plain", plain, "worst seed", worst),
        (plain_batched.name, plain_batched, "median seed", median),
    ):
        base_s, base_rows, base_lb = _plain_point(base)
        ub = r.stop != "converged"  # TMAB's own stop is later than its cap: the ratio is an upper bound
        lines.append(
            [
                f"{base_name} / TMAB at its certified stop, {label} ({r.name})"
                + (" [not certified: cap]" if ub else ""),
                ratio(base_s, r.seconds, base_lb, ub),
                ratio(base_rows, r.rows, base_lb, ub),
            ]
        )
        if base is plain:  # the targets are against whole-set plain
            met.append(not ub and base_s / r.seconds >= target and base_rows / r.rows >= target)
    table(["ratio", "CPU time", "forward rows"], lines)
    wrong = [str(seed) for seed, r in by_seed.items() if r.stop == "converged" and not r.final_correct]
    capped = [str(seed) for seed, r in by_seed.items() if r.stop != "converged"]
    all_ok = not wrong and not capped
    bound = " (plain never got there: lower bounds)" if plain.stable is None else ""
    out(
        f"target >= {target:.0f}x at TMAB's certified stop: median seed {'met' if met[0] else 'NOT met'}, worst seed "
        f"{'met' if met[1] else 'NOT met'}{bound}; correct at the certified stop in every seed: "
        + (
            "yes"
            if all_ok
            else "NO ("
            + "; ".join(
                p
                for p in (
                    f"wrong top-10 at its stop: seeds {', '.join(wrong)}" if wrong else "",
                    f"cap before convergence (not certified): seeds {', '.join(capped)}" if capped else "",
                )
                if p
            )
            + ")"
        )
    )
    return median


def _stable_lines(model: Model, scale: Scale, plain: RunResult, runs: list[RunResult]) -> None:
    """The earlier measure, kept beside the headline: both at their first stable-correct point."""
    plain_s, plain_rows, lb = _plain_point(plain)
    median, slowest = _by_time(runs, lambda r: r.stable.seconds if r.stable else math.inf)
    lines = []
    for label, r in (("median seed", median), ("slowest seed", slowest)):
        s = r.stable
        if s is not None:
            lines.append(
                [
                    f"plain / TMAB at the stable-correct point, {label} ({r.name})",
                    ratio(plain_s, s.seconds, lb),
                    ratio(plain_rows, s.rows, lb),
                ]
            )
        else:
            lines.append([f"plain / TMAB at the stable-correct point, {label} ({r.name})", "not reached", "-"])
    ts = median.stable
    if lb and ts is not None:
        per_perm_s, per_perm_rows = plain.seconds / max(1, plain.iterations), plain.rows / max(1, plain.iterations)
        lines.append(
            [
                f"estimate: plain at TMAB's {ts.iterations} perms / TMAB",
                ratio(per_perm_s * ts.iterations, ts.seconds),
                ratio(per_perm_rows * ts.iterations, ts.rows),
            ]
        )
    table(["ratio (stable-correct, as before)", "CPU time", "forward rows"], lines)
    if lb:
        out(f"plain did not get there within its {scale.plain_seconds[model.kind]:.0f} s cap: '>' marks lower bounds")


def peers(model: Model, scale: Scale, ref: torch.Tensor, plain: RunResult, tmab: RunResult) -> None:
    """Wall time until each peer first gives a correct top-10 (none has a stop rule), beside TMAB's certified stop."""
    game = model.game(None)
    cap = scale.peer_seconds[model.kind]
    per_eval = min(TMABConfig().coalitions_per_pass, game.max_coalitions_per_pass)

    def correct(v: torch.Tensor) -> bool:
        return is_correct(v, ref)

    results = [captum_first_correct(game, correct, cap, per_eval, SEED_CAPTUM)]
    if shapiq_version() is None:
        out("shapiq not installed: its approximators are not run (pip install -e '.[bench]')")
    else:
        results += [
            shapiq_first_correct(a, game, correct, cap, SEED_SHAPIQ, scale.peer_probe_players) for a in APPROXIMATORS
        ]
    tmab_s = tmab.seconds
    certified = tmab.stop == "converged"
    out(
        f"peers on the whole-set, untruncated game, each until its first correct top-10, {cap:.0f} s cap each; "
        f"shapiq: budgets doubling from its smallest sensible one, each run from scratch (random_state "
        f"{SEED_SHAPIQ}); Captum: one permutation per call, averaged. TMAB beside: median seed at its "
        f"{'certified stop' if certified else 'cap (not certified)'}"
    )
    rows: list[list[object]] = [
        [f"{tmab.name}, {'certified stop' if certified else 'cap'}", tmab.evaluations, tmab.iterations, None, tmab_s]
        + [
            "1.0x",
            f"its evaluations are on batches of {min(DEFAULT_BATCH, len(model.data))} examples, the peers' on all "
            f"{len(model.data)}" + ("" if certified else "; not certified: its cap"),
        ]
    ]
    for p in results:
        rows.append(
            [
                p.name,
                p.evaluations if p.correct else None,
                p.permutations if p.correct else None,
                p.run_s if p.correct else None,
                p.cumulative_s if p.correct else None,
                ratio(
                    p.cumulative_s or None, tmab_s, lower_bound=not p.correct, upper_bound=not certified
                ),  # skipped: -
                p.note or "; ".join(f"{b:,}: {s:.1f} s{' ok' if ok else ''}" for b, s, ok in p.steps),
            ]
        )
    table(
        [
            "method",
            "evaluations (budget) at first correct",
            "perms",
            "that run (CPU s)",
            "cumulative (CPU s)",
            "peer / TMAB time",
            "budgets tried (run s) / note",
        ],
        rows,
    )
    cap_run = results[0]
    if cap_run.evaluations and plain.iterations:
        captum_per_perm = cap_run.cumulative_s / cap_run.evaluations * (game.n_players + 1)
        plain_per_perm = plain.seconds / plain.iterations
        out(
            f"plain: {plain_per_perm:.2f} s per permutation; Captum: {captum_per_perm:.2f} s per permutation "
            f"({'slower' if captum_per_perm > plain_per_perm else 'faster'} than our plain run by "
            f"{max(captum_per_perm, plain_per_perm) / max(1e-9, min(captum_per_perm, plain_per_perm)):.1f}x)"
        )


# --------------------------------------------------------------------------- (b)


def throughput(model: Model, iterations: int, scale: Scale) -> dict:
    base = TMABConfig()
    games = {
        (cache, grouped): model.game(128, cache_prefix=cache, grouped=grouped)
        for cache, grouped in ((True, True), (True, False), (False, False))
    }
    for game in games.values():
        _warm_up(game)
    configs = [
        ("batched, grouped (defaults)", (True, True), base.lanes, base.coalitions_per_pass),
        ("batched, not grouped", (True, False), base.lanes, base.coalitions_per_pass),
        ("one per pass", (True, False), 1, 1),
        ("batched, not grouped, no prefix cache", (False, False), base.lanes, base.coalitions_per_pass),
        ("one per pass, no prefix cache", (False, False), 1, 1),
    ]
    configs += [
        (f"grouped, {cpp} per pass", (True, True), base.lanes, cpp)
        for cpp in (16, 32, 128)
        if cpp != base.coalitions_per_pass
    ]
    results = {}
    for label, key, lanes, cpp in configs:
        game = games[key]
        cfg = TMABConfig(
            mode="all",
            truncation=0.0,
            min_samples=OFF,
            lanes=lanes,
            coalitions_per_pass=cpp,
            seed=SEED_THROUGHPUT,
            max_iterations=iterations,
        )
        est = run_tmab(game, cfg)
        per_pass = max(1, min(cpp, game.max_coalitions_per_pass))
        results[label] = (est, per_pass, game.batch_size, game, cfg)
    rows = []
    for label, (est, per_pass, batch, _, _) in results.items():
        rows.append(
            [
                label,
                per_pass,
                per_pass * batch,
                est.iterations,
                est.evaluations,
                est.elapsed_s,
                est.evaluations / est.elapsed_s,
                est.rows / est.elapsed_s,
            ]
        )
    table(
        ["configuration", "coalitions/pass", "rows/pass", "perms", "evaluations", "time (s)", "evals/s", "rows/s"], rows
    )
    out(
        "every configuration evaluates the same coalitions (same seed and lanes); 'rows' counts a coalition's "
        "batch once, whether or not grouping computed all of it"
    )
    rate = {k: v[0].evaluations / v[0].elapsed_s for k, v in results.items()}
    same = torch.allclose(
        results["batched, grouped (defaults)"][0].values, results["batched, not grouped"][0].values, atol=1e-9
    )
    ratios = [
        ["batched, grouped (defaults) / one per pass", rate["batched, grouped (defaults)"] / rate["one per pass"]],
        ["grouped / not grouped (batched)", rate["batched, grouped (defaults)"] / rate["batched, not grouped"]],
        ["batched, not grouped / one per pass", rate["batched, not grouped"] / rate["one per pass"]],
        [
            "prefix cache on / off (batched, not grouped)",
            rate["batched, not grouped"] / rate["batched, not grouped, no prefix cache"],
        ],
        ["prefix cache on / off (one per pass)", rate["one per pass"] / rate["one per pass, no prefix cache"]],
        [
            "defaults / one per pass without cache",
            rate["batched, grouped (defaults)"] / rate["one per pass, no prefix cache"],
        ],
    ]
    table(["ratio of evaluations per second", "x"], [[a, f"{b:.2f}x"] for a, b in ratios])
    out(f"grouped and not grouped give the same values: {'yes' if same else 'NO'}")
    best = ratios[0][1]
    verdict = "met" if best >= 3 else "NOT met"
    out(f"target >= 3x (batched vs one coalition per pass, same game): {verdict} ({best:.2f}x)")
    return {label: results[label] for label in ("batched, grouped (defaults)", "batched, not grouped", "one per pass")}


def _warm_up(game: NeuronGame) -> None:
    """One pass at each coalition count used below, so one-time kernel setup is not timed."""
    sample = game.sample(torch.Generator().manual_seed(0), 1)
    for m in sorted({1, max(1, min(TMABConfig().coalitions_per_pass, game.max_coalitions_per_pass))}):
        game.evaluate(sample, torch.ones(m, game.n_players, dtype=torch.bool), torch.zeros(m, dtype=torch.long))


# --------------------------------------------------------------------------- (c)


def flops(model: Model, runs: dict, peak: float) -> None:
    """FLOPs really executed per second (counted by FlopCounterMode on the same walks), and the *effective*
    rate: every coalition's rows priced at a full suffix pass, as if grouping had not saved any of it."""
    from torch.utils.flop_counter import FlopCounterMode

    x = model.data.inputs[:1]
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model.module(x)
    forward = counter.get_total_flops()
    game = model.game(128, grouped=False)
    with FlopCounterMode(display=False) as counter:
        with torch.inference_mode():
            frontier = game.model.prefix(x)
    prefix = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        with torch.inference_mode():
            game.model.run(frontier, torch.zeros(1, dtype=torch.long), torch.ones(1, game.n_players))
    suffix = counter.get_total_flops()
    out(
        f"FLOPs per example: whole forward {forward:,}; masked suffix (run once per coalition row when not grouped) "
        f"{suffix:,}; prefix (once per example per batch) {prefix:,}"
    )
    rows = []
    for label, (est, _, _, run_game, cfg) in runs.items():
        with FlopCounterMode(display=False) as counter:  # the same walks, counted (a counted run is slower)
            counted = run_tmab(run_game, replace(cfg, max_iterations=min(cfg.max_iterations, 2)))
        per_evaluation = counter.get_total_flops() / counted.evaluations
        achieved = per_evaluation * est.evaluations / est.elapsed_s
        effective = suffix * est.rows / est.elapsed_s
        rows.append(
            [
                label,
                est.rows / est.elapsed_s,
                f"{per_evaluation / 1e6:,.1f}",
                achieved / 1e9,
                f"{100 * achieved / peak:.1f}%",
                effective / 1e9,
            ]
        )
    table(
        [
            "run, section (b)",
            "rows/s",
            "MFLOP per evaluation (counted)",
            "achieved GFLOP/s",
            "achieved / peak",
            "effective suffix GFLOP/s",
        ],
        rows,
    )


# --------------------------------------------------------------------------- (d)


def sweep(model: Model, ref: torch.Tensor, scale: Scale, defaults_runs: dict[int, RunResult]) -> None:
    """``defaults_runs``: section (a)'s TMAB runs by seed, reused (cut at the cap) for the seeds they share."""
    cap = scale.sweep_seconds
    base = TMABConfig()
    batch = DEFAULT_BATCH
    variants: list[tuple[str, dict, int | None]] = [("defaults", {}, batch)]
    variants += [
        (f"bound={b}", {"bound": b}, batch) for b in ("normal", "bernstein", "bernstein_observed") if b != base.bound
    ]
    variants += [(f"truncation={t}", {"truncation": t}, batch) for t in (0.0, 0.05, 0.1, 0.2) if t != base.truncation]
    variants += [(f"batch_size={b or 'all'}", {}, b) for b in (64, 128, None) if b != batch]
    variants += [(f"lanes={n}", {"lanes": n}, batch) for n in (1, 4, 8) if n != base.lanes]

    def both(values: list[object]) -> str:
        return " / ".join(_fmt(v) for v in values)

    rows = []
    for label, changes, batch in variants:
        runs = []
        for seed in scale.sweep_seeds:
            if label == "defaults" and seed in defaults_runs:
                runs.append(_cut(defaults_runs[seed], cap))
            else:
                runs.append(
                    tmab_run(model, ref, cap, seed=seed, batch_size=batch, confirm=scale.sweep_confirm, **changes)
                )
        stables = [r.stable for r in runs]
        reached = [s for s in stables if s is not None]
        rows.append(
            [
                label,
                both([f"{s.seconds:.1f}" if s else "not reached" for s in stables]),
                both([s.rows if s else None for s in stables]),
                both([s.iterations if s else None for s in stables]),
                f"{len(reached)}/{len(runs)}",
                both([r.stop.replace(" (cut from (a))", "*") for r in runs]),
                sum(r.rows for r in runs) / max(1e-9, sum(r.seconds for r in runs)),
                both([r.final_correct for r in runs]),
            ]
        )
    out(
        f"digits CNN, one setting changed at a time from TMABConfig() (mode top, top_k 10); seeds "
        f"{' / '.join(map(str, scale.sweep_seeds))}; cap {cap:.0f} s per run; a run also stops once its top-10 has "
        f"stayed correct for max({scale.sweep_confirm}, half its permutations) permutations ('confirmed'). "
        f"*: section (a)'s run with that seed (seeds {', '.join(map(str, sorted(defaults_runs))) or 'none'}), seen "
        "up to the cap. Two seeds per configuration: the time to a "
        "stable-correct top-10 varies ~2x between seeds, so only larger differences mean something."
    )
    table(
        [
            "configuration",
            "time to stable-correct (s)",
            "rows then",
            "perms then",
            "reached",
            "stop",
            "rows/s",
            "top-10 at stop correct",
        ],
        rows,
    )


def _cut(run: RunResult, cap: float) -> RunResult:
    """The same run seen as if it had been stopped at ``cap`` seconds (for the defaults row of the sweep)."""
    if run.seconds <= cap:
        return run
    pts = [p for p in run.points if p.seconds <= cap]
    last = pts[-1] if pts else Point(0, 0, 0, 0.0, False)
    return RunResult(
        run.name,
        pts,
        last.iterations,
        last.evaluations,
        last.rows,
        last.seconds,
        "max_seconds (cut from (a))",
        last.correct,
    )


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny scale: checks that the benchmark still runs")
    parser.add_argument(
        "--sections", default="abcd", help="which sections to run (default: abcd); c needs b, d needs a"
    )
    parser.add_argument("--models", default="digits,wide", help="comma-separated: digits, wide")
    args = parser.parse_args(argv)
    kinds = [k for k in ("digits", "wide") if k in args.models.split(",")]
    scale = QUICK if args.quick else FULL
    started = time.monotonic()
    prepare_process(None)  # the service's threads (the module docstring's 'Clock' says why) and heap

    section(f"Estimator benchmark ({scale.name} scale)")
    for line in machine_lines():
        out(line)
    peak = matmul_peak(scale.peak_size)
    out(f"float32 matmul peak (torch.mm {scale.peak_size}x{scale.peak_size}, best of 5): {peak / 1e9:.1f} GFLOP/s")

    split = load_digits_split()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = [build_model(kind, scale, split, Path(tmp)) for kind in kinds]
        for m in models:
            game = m.game(128)
            out(
                f"{m.label}: {game.n_players:,} neurons; trained {scale.epochs} epochs in {m.train_s:.1f} s; "
                f"eval set {len(m.data)} test examples, accuracy {m.accuracy:.3f}"
            )

        for m in models if "a" in args.sections else []:
            section(f"(a) Time to a correct top-10: {m.label}")
            ref = reference_run(m, scale)
            print_reference(m, ref)
            results[m.kind] = {"ref": ref, **time_to_correct(m, scale, ref)}

        batched = {}
        for m in models if "b" in args.sections else []:
            section(
                f"(b) Evaluations per second: {m.label} (batch 128, truncation off, bandit off, "
                f"{scale.throughput_iterations[m.kind]} permutations each)"
            )
            batched[m.kind] = throughput(m, scale.throughput_iterations[m.kind], scale)

        if "c" in args.sections:
            section("(c) Achieved FLOP/s")
            out(f"float32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
            for m in models:
                out(f"-- {m.label}")
                if m.kind in batched:
                    flops(m, batched[m.kind], peak)

        if "d" in args.sections and "digits" in results:
            section("(d) Defaults sweep on the digits CNN")
            sweep(models[0], results["digits"]["ref"].values, scale, results["digits"]["tmab"])

    out(f"total wall time {time.monotonic() - started:.0f} s; load average at the end: {_load()}")


if __name__ == "__main__":
    main(sys.argv[1:])
