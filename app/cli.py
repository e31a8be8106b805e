"""The ``neuronshap`` command.

``neuronshap estimate MODEL DATA --metric NAME …`` ranks a model's neurons
locally, without the service. User errors (a bad file, a spec that makes no
sense) print one line naming the problem and the fix and exit with status 2;
Ctrl-C stops the run cooperatively and prints the estimates so far.

The estimator (and torch) is imported only by the commands that run it, so
that the HTTP side of this command stays light.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import TextIO

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuronshap", description="Which neurons of a network carry a metric.")
    commands = parser.add_subparsers(dest="command", required=True)

    est = commands.add_parser(
        "estimate",
        help="rank the neurons of a model on an evaluation set (TMAB-Shapley)",
        description="Estimate the Shapley value of every chosen neuron for a metric, with confidence bounds.",
    )
    est.add_argument("model", help="an ONNX model (.onnx) or a torch.export program (.pt2)")
    est.add_argument("data", help=".npz or .safetensors with `inputs`, `labels` and optionally `groups`")
    est.add_argument("--metric", required=True,
                     help="accuracy | log_likelihood | class_recall | group_accuracy | worst_group_accuracy | group_gap")
    est.add_argument("--class", dest="class_", type=int, help="the class, for class_recall")
    est.add_argument("--group", type=int, help="the group, for group_accuracy")
    est.add_argument("--groups", type=int, nargs=2, metavar=("G0", "G1"), help="the two groups, for group_gap")
    est.add_argument("--layers", nargs="+", metavar="GLOB",
                     help="layers whose neurons to rank, by module name or glob (default: every hidden conv/linear layer)")
    est.add_argument("--ablation", choices=("zero", "mean"), default="zero", help="what a removed neuron outputs (default zero)")
    tuning = est.add_argument_group("estimator settings", "each defaults to the library's TMABConfig default")
    tuning.add_argument("--mode", choices=("top", "bottom", "all"),
                        help="find the top-k helpful neurons, the bottom-k harmful ones, or value all (default top)")
    tuning.add_argument("--top-k", type=int)
    tuning.add_argument("--delta", type=float, help="error level of all bounds together")
    tuning.add_argument("--epsilon", type=float, help="near-tie tolerance around the top-k threshold")
    tuning.add_argument("--half-width", type=float, help="target bound half-width for --mode all")
    tuning.add_argument("--bound", choices=("normal", "bernstein", "bernstein_observed"))
    tuning.add_argument("--truncation", type=float, help="truncation fraction; 0 turns truncation off")
    tuning.add_argument("--seed", type=int)
    tuning.add_argument("--max-seconds", type=float)
    tuning.add_argument("--max-iterations", type=int)
    tuning.add_argument("--max-evaluations", type=int)
    est.add_argument("--batch-size", type=int, default=128, help="examples per evaluation batch (default 128)")
    est.add_argument("--device", help="cpu, cuda, cuda:1 … (default: the GPU if there is one)")
    est.add_argument("--limit", type=int, default=20, help="neurons to print as text (--json prints all)")
    est.add_argument("--json", action="store_true", help="print the ranked neurons as a JSON list (API.md's shape)")
    est.set_defaults(handler=cmd_estimate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from worker.shapley.errors import UserInputError

    try:
        return args.handler(args)
    except UserInputError as exc:
        print(f"neuronshap: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def cmd_estimate(args: argparse.Namespace) -> int:
    from worker.shapley import (
        MetricSpec, NeuronGame, TMABConfig, load_data, load_model, ranked_neurons, run_summary, run_tmab,
    )

    metric = MetricSpec(args.metric, class_=args.class_, group=args.group,
                        groups=tuple(args.groups) if args.groups else None)
    settings = ("mode", "top_k", "delta", "epsilon", "half_width", "bound", "truncation", "seed",
                "max_seconds", "max_iterations", "max_evaluations")
    config = TMABConfig(**{k: getattr(args, k) for k in settings if getattr(args, k) is not None})
    game = NeuronGame(load_model(args.model), load_data(args.data), metric, layers=args.layers,
                      ablation=args.ablation, batch_size=args.batch_size, device=args.device)
    config.validate(game.n_players)

    interrupted = False

    def on_sigint(signum, frame) -> None:
        nonlocal interrupted
        interrupted = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    bar = ProgressBar(sys.stderr, game.n_players)
    try:
        estimate = run_tmab(game, config, on_progress=bar.update, should_stop=lambda: interrupted)
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()

    neurons = ranked_neurons(game, estimate)
    if args.json:
        json.dump(neurons, sys.stdout)
        sys.stdout.write("\n")
    else:
        print_table(neurons, run_summary(game, estimate), args.limit, bottom_first=config.mode == "bottom")
    return 0


class ProgressBar:
    """One status line on a terminal (redrawn), or a line every few seconds in a log."""

    def __init__(self, stream: TextIO, players: int, width: int = 24) -> None:
        self.stream, self.players, self.width = stream, players, width
        self.tty = stream.isatty()
        self.last = 0.0
        self.drawn = False

    def update(self, progress) -> None:
        now = time.monotonic()
        if now - self.last < (0.1 if self.tty else 5.0):
            return
        self.last = now
        est = progress.estimate
        decided = self.players - progress.undecided
        filled = round(self.width * decided / self.players)
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {decided}/{self.players} decided | "
                f"{est.iterations} permutations | {est.evaluations} evaluations | {est.elapsed_s:.1f}s")
        self.stream.write(f"\r{line}\033[K" if self.tty else line + "\n")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def print_table(neurons: list[dict], summary: dict, limit: int, bottom_first: bool) -> None:
    rows = list(reversed(neurons)) if bottom_first else neurons
    game = summary["game"]
    print(f"metric {game['metric']['name']}: V(all) = {_fmt(summary['v_full'])}, V(none) = {_fmt(summary['v_empty'])}; "
          f"{summary['players']} neurons, {summary['undecided']} undecided; "
          f"{summary['iterations']} permutations, {summary['evaluations']} evaluations, "
          f"{summary['elapsed_s']:.1f}s; stopped: {summary['stop_reason']}; "
          f"bound {summary['estimator']['bound']}, ablation {game['ablation']}")
    print(f"{'rank':>5} {'layer':<24} {'index':>6} {'value':>10} {'lower':>10} {'upper':>10} {'samples':>8}  status")
    for n in rows[:limit]:
        print(f"{n['rank']:>5} {n['layer']:<24} {n['index']:>6} {n['value']:>10.5f} {n['lower']:>10.5f} "
              f"{n['upper']:>10.5f} {n['samples']:>8}  {n['status']}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
