"""Benchmark: scale, measured (issue 14, item 6): a certified top-10 on a CPU, and the engine's FLOP/s on a GPU.

Run from the repository root::

    python -m bench.bench_scale                  # CPU section (15-minute cap); the GPU section where CUDA is
    python -m bench.bench_scale --device cuda    # the same, the GPU section required
    python -m bench.bench_scale --device cpu     # the GPU section's code run on this CPU (slow at 224 px)
    python -m bench.bench_scale --quick          # both sections at a tiny scale, SqueezeNet only (< ~1 min)

Everything printed is measured in the one run. The networks are the ONNX Model
Zoo's from the onnx wheel with seeded random weights (``tests.harness.zoo``),
on random images labelled by the intact model's own argmax (so the intact
model's accuracy is 1 and a coalition's value is how much of its decision it
keeps), metric accuracy, every hidden channel a player, the library's defaults
and threads (``worker.threads``).

**CPU scale.** SqueezeNet 1.1 (2,944 channels, the paper's second model) at
112 px, one process on the CPU: TMAB with its defaults (mode top, top_k 10)
until it certifies its top-10 (every player decided) or the wall-clock cap
(default 900 s, the 15-minute target), counted from the start of loading as a
job's budget is. A progress line every ~30 s shows a long run is alive.

**GPU.** Runs where ``torch.cuda.is_available()``, or on the device that
``--device`` names (``cpu``: the same code on the CPU, as ``--quick`` does).
For SqueezeNet 1.1 and ResNet-50 (26,560 channels) at 224 px: evaluations per
second of the engine as TMAB drives it (``run_tmab`` with the defaults, timed
over a fixed number of forward passes after one untimed pass), the FLOP/s it
really executes (FlopCounterMode on the same passes) and the *effective* rate
(every coalition priced at one plain forward of the converted graph per
example), both against a bf16 and an fp32 matmul peak measured in the same
run on the same device; the target is 40 % of the bf16 peak. Then the time to
a certified top-100 on Inception v1 (7,280 channels, 224 px) under a cap
(default 3,600 s). The engine runs float32 (the library has no bf16 path), so
the bf16 peak is what the device could do, not what this engine is built for.
On a CUDA device the clocks are read after ``torch.cuda.synchronize``. A
pass's activation budget is the library's (half the GPU's memory) unless
``--memory-gib`` sets it; the coalitions per pass it allows are printed.

``--quick`` runs both sections on SqueezeNet 1.1 at 32 px with a few examples
and short caps: ResNet-50's and Inception v1's graphs take 224 px only, and
their game builds alone took 10-180 s on a loaded 2-core box.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.bench_engine import LABELS, code_line
from bench.bench_estimator import _load, machine_lines, out, section, table
from tests.harness.zoo import randomized
from worker.process import prepare_process
from worker.shapley import Estimate, MetricSpec, NeuronGame, TMABConfig, load_model, run_tmab
from worker.shapley.data import EvalData
from worker.shapley.tmab import PassProgress, Progress

TOP_K_GPU = 100  # the top-k of the run on an Inception-sized network


@dataclass(frozen=True)
class Scale:
    name: str
    cpu_size: int  # SqueezeNet's image size in the CPU section
    cpu_examples: int
    cap_s: float  # the CPU section's wall-clock cap, loading and building included
    # The GPU section's networks and image sizes (ResNet-50 and Inception v1 take 224 px only, and their builds
    # alone take 10-20 s on this CPU: quick leaves them out, and runs the same code on SqueezeNet at 32 px)
    rate_networks: tuple[tuple[str, int], ...]
    top100_network: tuple[str, int]
    gpu_examples: int
    passes: int  # timed forward passes per network for evaluations/s
    top100_examples: int
    top100_cap_s: float
    peak_size: int  # matmul side for the peaks on a GPU
    cpu_peak_size: int  # and on the CPU, whose bf16 matmul may run at ~1 GFLOP/s (no bf16 units)
    progress_s: float  # seconds between progress lines
    engine: TMABConfig  # the GPU section's settings (quick: small passes)


FULL = Scale(
    "full",
    cpu_size=112,
    cpu_examples=128,
    cap_s=900.0,
    rate_networks=(("squeezenet", 224), ("resnet50", 224)),
    top100_network=("inception_v1", 224),
    gpu_examples=128,
    passes=30,
    top100_examples=128,
    top100_cap_s=3600.0,
    peak_size=8192,
    cpu_peak_size=1024,
    progress_s=30.0,
    engine=TMABConfig(),
)
QUICK = Scale(
    "quick",
    cpu_size=32,
    cpu_examples=16,
    cap_s=6.0,
    rate_networks=(("squeezenet", 32),),
    top100_network=("squeezenet", 32),
    gpu_examples=2,
    passes=2,
    top100_examples=2,
    top100_cap_s=4.0,
    peak_size=512,
    cpu_peak_size=512,
    progress_s=3.0,
    engine=TMABConfig(lanes=1, coalitions_per_pass=2),
)


# --------------------------------------------------------------------------- device


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_on(device: torch.device, dtype: torch.dtype, size: int, reps: int = 5) -> float:
    """Best FLOP/s of ``torch.mm`` on ``size`` x ``size`` matrices of ``dtype`` on ``device``, each timed between
    synchronisations. (``bench_estimator.matmul_peak`` is the float32 CPU case without them: on a GPU its clock
    would read the launch, not the work.)"""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best


def device_lines(device: torch.device) -> list[str]:
    """What the device is and how it runs float32: TF32 lets float32 matmuls and convolutions use tensor cores."""
    if device.type != "cuda":
        return [f"device: {device} (the CPU: the GPU section's code path at this machine's speed)"]
    props = torch.cuda.get_device_properties(device)
    return [
        f"device: {torch.cuda.get_device_name(device)}, {props.total_memory / 2**30:.0f} GiB; "
        f"CUDA {torch.version.cuda}",
        f"TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN convolutions {torch.backends.cudnn.allow_tf32}",
    ]


# --------------------------------------------------------------------------- networks


@dataclass
class Network:
    """A zoo network, converted, with random images it labels itself, and one plain forward's FLOPs per example."""

    name: str
    model: torch.fx.GraphModule
    data: EvalData
    size: int
    load_s: float
    forward_flops: int


def network(name: str, folder: Path, size: int, examples: int) -> Network:
    """The zoo graph with seeded random weights, at ``size`` px, on ``examples`` random images labelled by its own
    argmax (on the CPU, 16 at a time, before the game is built)."""
    path = randomized(name, folder / f"{name}.onnx")
    t = time.perf_counter()
    model = load_model(path)
    load_s = time.perf_counter() - t
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(examples, 3, size, size, generator=generator)
    with torch.inference_mode():
        y = torch.cat([model(x[i : i + 16]).argmax(1) for i in range(0, examples, 16)])
        with FlopCounterMode(display=False) as counter:
            model(x[:1])
    return Network(name, model, EvalData(x, y), size, load_s, counter.get_total_flops())


def build(net: Network, device: torch.device, memory_bytes: int | None = None) -> tuple[NeuronGame, float]:
    """The game of every hidden channel with the library's defaults (``memory_bytes``: a pass's activation budget,
    ``None`` for the library's); (game, seconds to build)."""
    t = time.perf_counter()
    game = NeuronGame(net.model, net.data, MetricSpec("accuracy"), device=device, memory_bytes=memory_bytes)
    sync(device)
    return game, time.perf_counter() - t


def describe(net: Network, game: NeuronGame, build_s: float, config: TMABConfig) -> str:
    per_pass = min(config.coalitions_per_pass, game.max_coalitions_per_pass)
    d = game.describe()
    engine = "deferred gates" if d["deferred_gates"] else "grouped" if d["grouped_evaluation"] else "plain suffix"
    return (
        f"{LABELS[net.name]}: {game.n_players:,} players; {len(game.data)} examples at {net.size} px, batch "
        f"{game.batch_size}; load {net.load_s:.1f} s, build {build_s:.1f} s; up to {per_pass} coalitions per pass "
        f"({engine}; activation estimate {game.bytes_per_row * game.batch_size / 2**20:,.0f} MiB a coalition); "
        f"plain forward {net.forward_flops / 1e9:.2f} GFLOP per example"
    )


# --------------------------------------------------------------------------- certified top-k


class Ticker:
    """A progress line at most every ``every`` seconds: after a round (``on_progress``: decided counts) or, in a
    round longer than that, after a pass (``on_pass``), so that a long run shows it is alive."""

    def __init__(self, every: float, n_players: int) -> None:
        self.every, self.n = every, n_players
        self.last = time.monotonic()
        self.rounds = 0

    def _due(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.every:
            return False
        self.last = now
        return True

    def on_progress(self, progress: Progress) -> None:
        self.rounds += 1
        if self._due():
            e = progress.estimate
            out(
                f"  [{e.elapsed_s:6.0f} s] round {self.rounds}, {e.iterations} permutations, "
                f"{e.evaluations:,} evaluations; decided {self.n - progress.undecided:,}, "
                f"undecided {progress.undecided:,} (load average {_load()})"
            )

    def on_pass(self, p: PassProgress) -> None:
        if self._due():
            out(
                f"  [{p.elapsed_s:6.0f} s] in round {self.rounds + 1}: {p.evaluations:,} evaluations, "
                f"{p.walks_done}/{p.lanes} walks done, {p.undecided:,} undecided (load average {_load()})"
            )


def certify(game: NeuronGame, config: TMABConfig, started_at: float, every: float) -> None:
    """Run TMAB to its own stop under ``config``'s cap, with progress lines, and print what it reached."""
    ticker = Ticker(every, game.n_players)
    est = run_tmab(game, config, on_progress=ticker.on_progress, on_pass=ticker.on_pass, started_at=started_at)
    sync(game.device)
    estimating = est.elapsed_s - est.setup_s
    ran = est.evaluations + est.discarded_evaluations  # the round cut short at the stop ran too
    undecided = est.status.count("undecided")
    out(
        f"evaluations: {ran:,} ({est.discarded_evaluations:,} of them in the round the stop cut short) in "
        f"{estimating:.1f} s of estimation: {ran / max(estimating, 1e-9):,.1f} evaluations/s"
    )
    out(f"rounds: {ticker.rounds}; permutations: {est.iterations} (lanes per round: {config.lanes})")
    out(f"decided: {game.n_players - undecided:,}; undecided: {undecided:,}; stop reason: {est.stop_reason}")
    if est.stop_reason == "converged":
        out(
            f"time to certified stop: {est.elapsed_s:.1f} s for the top-{config.top_k} (loading and building "
            f"included; cap {config.max_seconds:g} s)"
        )
    else:
        out(
            f"not certified within cap ({config.max_seconds:g} s, loading and building included): "
            f"{game.n_players - undecided:,} of {game.n_players:,} players decided"
        )
    if est.iterations == 0:
        out(f"no round ended within the cap: no values to rank the top-{config.top_k} by")
        return
    half = (est.upper - est.lower) / 2
    order = torch.argsort(est.values, descending=True, stable=True)[: config.top_k]
    names = game.player_names()
    shown = order[:10] if config.top_k > 10 else order
    first = f" (the first {len(shown)})" if len(shown) < config.top_k else ""
    out(f"top-{config.top_k} by value{first}, with the half-widths of their intervals:")
    table(
        ["rank", "layer", "channel", "value", "interval half-width", "status"],
        [
            [r + 1, names[i][0], names[i][1], float(est.values[i]), float(half[i]), est.status[i]]
            for r, i in enumerate(shown.tolist())
        ],
    )
    if len(shown) < config.top_k:
        out(
            f"(half-widths over the whole top-{config.top_k}: "
            f"{float(half[order].min()):.4f} to {float(half[order].max()):.4f})"
        )


def cpu_section(scale: Scale, folder: Path, threads: int) -> None:
    section(f"CPU scale: certified top-10 on SqueezeNet 1.1 at {scale.cpu_size} px, cap {scale.cap_s:g} s")
    out(f"load average at the start: {_load()}; torch threads: {threads}")
    started = time.monotonic()
    cpu = torch.device("cpu")
    net = network("squeezenet", folder, scale.cpu_size, scale.cpu_examples)
    game, build_s = build(net, cpu)
    config = TMABConfig(max_seconds=scale.cap_s)
    out(describe(net, game, build_s, config))
    certify(game, config, started, scale.progress_s)
    out(f"load average at the end: {_load()}; torch threads: {torch.get_num_threads()}")


# --------------------------------------------------------------------------- GPU: rate and FLOP/s


@dataclass
class Rate:
    evaluations: int
    rows: int
    seconds: float
    flops_per_evaluation: float  # counted on the same passes


def engine_rate(game: NeuronGame, config: TMABConfig, passes: int) -> Rate:
    """``passes`` forward passes of TMAB under ``config``, after one untimed pass (kernels, allocator); then the
    same passes again (same seed) under FlopCounterMode for the FLOPs they really execute."""

    def run(n: int) -> tuple[Estimate, float]:
        done = [0]

        def count(_: PassProgress) -> None:
            done[0] += 1

        sync(game.device)
        t = time.perf_counter()
        est = run_tmab(game, config, on_pass=count, should_stop=lambda: done[0] >= n)
        sync(game.device)
        return est, time.perf_counter() - t

    run(1)
    est, seconds = run(passes)
    with FlopCounterMode(display=False) as counter:
        counted, _ = run(passes)
    evaluated = counted.evaluations + counted.discarded_evaluations
    ran = est.evaluations + est.discarded_evaluations
    rows = ran * game.rows_per_coalition
    return Rate(ran, rows, seconds, counter.get_total_flops() / max(1, evaluated))


def gpu_section(scale: Scale, device: torch.device, folder: Path, memory_bytes: int | None) -> None:
    section(f"GPU section: engine evaluations/s and FLOP/s on {device}")
    for line in device_lines(device):
        out(line)
    budget = "the library's default" if memory_bytes is None else f"{memory_bytes / 2**30:g} GiB (--memory-gib)"
    out(f"a pass's activation budget: {budget}")
    out(f"load average at the start: {_load()}")
    side = scale.peak_size if device.type == "cuda" else scale.cpu_peak_size
    peaks = {dtype: matmul_peak_on(device, dtype, side) for dtype in (torch.bfloat16, torch.float32)}
    bf16, fp32 = peaks[torch.bfloat16], peaks[torch.float32]
    out(
        f"bf16 matmul peak {bf16 / 1e9:,.1f} GFLOP/s; fp32 matmul peak {fp32 / 1e9:,.1f} GFLOP/s "
        f"(torch.mm {side}x{side}, best of 5, this device, this run)"
    )
    if bf16 < fp32:
        out("this device's bf16 matmul is slower than its fp32 one (no bf16 units): its % of bf16 peak means little")
    config = scale.engine
    rows, verdict = [], []
    for name, size in scale.rate_networks:
        net = network(name, folder, size, scale.gpu_examples)
        game, build_s = build(net, device, memory_bytes)
        out(describe(net, game, build_s, config))
        r = engine_rate(game, config, scale.passes)
        achieved = r.flops_per_evaluation * r.evaluations / r.seconds
        effective = net.forward_flops * r.rows / r.seconds
        share = 100 * achieved / bf16
        met = "no verdict: bf16 is slower than fp32 here" if bf16 < fp32 else "met" if share >= 40 else "not met"
        verdict.append(f"{LABELS[name]} {share:.1f}% ({met})")
        rows.append(
            [
                LABELS[name],
                f"{size} px",
                game.n_players,
                game.batch_size,
                min(config.coalitions_per_pass, game.max_coalitions_per_pass),
                scale.passes,
                r.evaluations,
                r.seconds,
                r.evaluations / r.seconds,
                r.flops_per_evaluation / 1e6,
                achieved / 1e9,
                f"{share:.1f}%",
                f"{100 * achieved / fp32:.1f}%",
                effective / 1e9,
                f"{100 * effective / bf16:.1f}%",
            ]
        )
        del game, net
    out()
    table(
        [
            "network",
            "images",
            "players",
            "batch",
            "coalitions/pass",
            "passes",
            "evaluations",
            "s",
            "evaluations/s",
            "MFLOP/evaluation (counted)",
            "achieved GFLOP/s",
            "% of bf16 peak",
            "% of fp32 peak",
            "effective GFLOP/s",
            "effective % of bf16 peak",
        ],
        rows,
    )
    out(
        f"TMAB's own passes (lanes {config.lanes}, up to {config.coalitions_per_pass} coalitions a pass as the "
        "game's memory bound allows), timed after one untimed pass. 'achieved': the FLOPs the engine really "
        "executes (counted on the same passes; grouping and deferred gates skip work); 'effective': every "
        "coalition's rows priced at one plain forward of the converted graph."
    )
    out(f"target: achieved >= 40% of the bf16 peak: {', '.join(verdict)}")

    name, size = scale.top100_network
    section(
        f"Time to a certified top-{TOP_K_GPU}: {LABELS[name]} at {size} px on {device}, cap {scale.top100_cap_s:g} s"
    )
    started = time.monotonic()
    net = network(name, folder, size, scale.top100_examples)
    game, build_s = build(net, device, memory_bytes)
    config = replace(scale.engine, top_k=TOP_K_GPU, max_seconds=scale.top100_cap_s)
    out(describe(net, game, build_s, config))
    certify(game, config, started, scale.progress_s)
    out(f"load average at the end: {_load()}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="both sections at a tiny scale (on the CPU if no GPU)")
    parser.add_argument("--cap-s", type=float, help="the CPU section's wall-clock cap (default 900; quick 6)")
    parser.add_argument("--top100-cap-s", type=float, help="the top-100 run's cap (default 3600; quick 4)")
    parser.add_argument("--device", help="the GPU section's device (default: cuda if available, else skipped)")
    parser.add_argument("--sections", default="cpu,gpu", help="comma-separated, of: cpu, gpu (default both)")
    parser.add_argument(
        "--memory-gib", type=float, help="the GPU section's activation budget per pass (default: the library's)"
    )
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    scale = replace(scale, cap_s=args.cap_s or scale.cap_s, top100_cap_s=args.top100_cap_s or scale.top100_cap_s)
    wanted = args.device or ("cuda" if torch.cuda.is_available() else "cpu" if args.quick else None)
    threads = prepare_process(None)  # as a job runs
    started = time.monotonic()
    section(f"Scale benchmark ({scale.name} scale)")
    for line in [*machine_lines(), code_line()]:
        out(line)
    out(f"threads: {threads.intra_op} intra-op, {threads.interop} inter-op ({threads.source}, {threads.cores} cores)")
    sections = args.sections.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if "cpu" in sections:
            cpu_section(scale, Path(tmp), threads.intra_op)
        if "gpu" in sections:
            if wanted is None:
                section("GPU section: skipped (no CUDA device; --device cpu runs its code on the CPU)")
            else:
                memory = None if args.memory_gib is None else int(args.memory_gib * 2**30)
                gpu_section(scale, torch.device(wanted), Path(tmp), memory)
    out(f"total wall time {time.monotonic() - started:.0f} s; load average at the end: {_load()}")


if __name__ == "__main__":
    main(sys.argv[1:])
