"""The ``neuronshap`` command.

``neuronshap estimate MODEL DATA --metric NAME …`` ranks a model's neurons
locally, without the service. ``serve``, ``worker`` and ``migrate`` run the
service; ``submit``, ``status`` and ``neurons`` talk to it over HTTP, for
pipelines. User errors (a bad file, a spec that makes no sense, a 4xx from
the service) print one line naming the problem and the fix and exit with
status 2; Ctrl-C stops a local run cooperatively and prints the estimates so
far.

The estimator (and torch) is imported only by the commands that run it, so
that the HTTP side of this command stays light.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, TextIO, get_args, get_origin

from pydantic import ValidationError

from app.core.config import get_settings
from app.jobs import spec

from . import __version__

EXIT_USER_ERROR = 2
EXIT_JOB_FAILED = 1
DEFAULT_URL = "http://127.0.0.1:8000"


class UsageError(Exception):
    """An option or file the user gave makes no sense; the message names it and says what would."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuronshap", description="Which neurons of a network carry a metric.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    est = commands.add_parser(
        "estimate",
        help="rank the neurons of a model on an evaluation set (TMAB-Shapley)",
        description="Estimate the Shapley value of every chosen neuron for a metric, with confidence bounds. "
        "The options are the job spec's fields (docs/API.md), checked before the model loads.",
    )
    est.add_argument("model", type=Path, help="an ONNX model (.onnx) or a torch.export program (.pt2)")
    est.add_argument("data", type=Path, help=".npz or .safetensors with `inputs`, `labels` and optionally `groups`")
    metric = spec.MetricSpec.model_fields
    est.add_argument("--metric", required=True, choices=spec.METRICS, metavar="NAME", help=metric["name"].description)
    est.add_argument("--class", dest="class_", type=int, help=metric["class_"].description)
    est.add_argument("--group", type=int, help=metric["group"].description)
    est.add_argument("--groups", type=int, nargs=2, metavar=("G0", "G1"), help=metric["groups"].description)
    players = spec.PlayersSpec.model_fields
    est.add_argument("--layers", nargs="+", metavar="GLOB", help=players["layers"].description)
    est.add_argument("--ablation", choices=spec.ABLATIONS, help=players["ablation"].description)
    tuning = est.add_argument_group("estimator settings", "the spec's `estimator` fields; defaults as in the spec")
    for name, info in spec.EstimatorSpec.model_fields.items():
        choices = get_args(info.annotation) if get_origin(info.annotation) is Literal else None
        number = next((t for t in (int, float) if t in (info.annotation, *get_args(info.annotation))), None)
        default = "" if info.default is None else f" (default {info.default})"
        # type=str for the other fields: what argparse does with no type (the string as given), spelled out for mypy.
        tuning.add_argument(
            _option(name),
            dest=name,
            choices=choices,
            type=number or str,
            help=f"{info.description}{default}",
        )
    est.add_argument("--device", help="cpu, cuda, cuda:1 … (default: the GPU if there is one)")
    est.add_argument(
        "--threads",
        type=_positive_int,
        help="torch threads (default $NEURONSHAP_THREADS, else one fewer than the cores this process may run on)",
    )
    est.add_argument(
        "--activation-memory-mb",
        type=_positive_int,
        help="activation memory one forward pass may use, in MiB (default $NEURONSHAP_ACTIVATION_MEMORY_MB, else "
        "half the memory of the device: the machine's on the CPU, the GPU's own)",
    )
    est.add_argument("--limit", type=int, default=20, help="neurons to print as text (--json prints all)")
    est.add_argument(
        "--json", action="store_true", help="print the ranked neurons as a JSON list (docs/API.md's shape)"
    )
    est.set_defaults(handler=cmd_estimate)

    serve = commands.add_parser("serve", help="run the HTTP API (embedded defaults unless NEURONSHAP_* says otherwise)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(handler=cmd_serve)

    worker = commands.add_parser("worker", help="run a Celery worker (needs NEURONSHAP_BROKER_URL)")
    worker.add_argument("--gpus", help="comma-separated GPU ids: one worker process per GPU (default: one process)")
    worker.add_argument("--name", default="neuronshap", help="worker name prefix, for Celery's monitoring")
    worker.set_defaults(handler=cmd_worker)

    migrate = commands.add_parser("migrate", help="bring the database schema to the newest migration")
    migrate.set_defaults(handler=cmd_migrate)

    keys = commands.add_parser("keys", help="create or revoke API keys (on the service's database)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="a new key for a tenant; printed once, stored only as a hash")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", help="what the key is for, e.g. the pipeline using it")
    create.set_defaults(handler=cmd_keys_create)
    revoke = key_commands.add_parser("revoke", help="revoke a key by its id (the 12 characters after nsk_)")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=cmd_keys_revoke)

    def client_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--url",
            type=_service_url,
            default=os.environ.get("NEURONSHAP_URL", DEFAULT_URL),
            help=f"the service, e.g. {DEFAULT_URL} (default $NEURONSHAP_URL, else that); "
            "host:port means http://host:port",
        )
        p.add_argument("--api-key", default=os.environ.get("NEURONSHAP_API_KEY"), help="default $NEURONSHAP_API_KEY")

    submit = commands.add_parser("submit", help="submit a job to the service")
    submit.add_argument("model", type=Path)
    submit.add_argument("data", type=Path)
    submit.add_argument(
        "--spec", required=True, type=Path, help="a JSON file with the job spec (docs/API.md, schema JobSpec)"
    )
    submit.add_argument("--idempotency-key", help="retrying with the same key returns the same job")
    submit.add_argument("--wait", action="store_true", help="follow the job to its end, then print the top neurons")
    submit.add_argument("--limit", type=int, default=10, help="neurons to print with --wait")
    submit.add_argument("--json", action="store_true", help="print JSON (the job; with --wait, the neurons)")
    client_args(submit)
    submit.set_defaults(handler=cmd_submit)

    status = commands.add_parser("status", help="print a job as JSON")
    status.add_argument("job_id")
    client_args(status)
    status.set_defaults(handler=cmd_status)

    neurons = commands.add_parser("neurons", help="print a job's ranked neurons (live while it runs)")
    neurons.add_argument("job_id")
    neurons.add_argument("--limit", type=int, default=20)
    neurons.add_argument("--order", choices=("desc", "asc"), default="desc")
    neurons.add_argument("--layer")
    neurons.add_argument("--json", action="store_true")
    client_args(neurons)
    neurons.set_defaults(handler=cmd_neurons)

    edit = commands.add_parser(
        "edit",
        help="remove neurons from a finished job's model: print the metric before and after, write the edited model",
    )
    edit.add_argument("job_id")
    chosen = edit.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--top", type=_positive_int, metavar="K", help="the K highest-valued neurons")
    chosen.add_argument("--bottom", type=_positive_int, metavar="K", help="the K lowest-valued neurons")
    chosen.add_argument("--negative", action="store_true", help="every neuron certainly harmful (upper bound < 0)")
    chosen.add_argument(
        "--repair",
        type=_positive_int,
        metavar="N",
        help="the lowest-valued neurons, up to N, as many as improve the metric on --data (needed)",
    )
    chosen.add_argument(
        "--prune",
        type=_prune,
        metavar="F",
        help="the lowest-valued neurons: a fraction of them (0.2), or a count (5)",
    )
    edit.add_argument("--data", type=Path, help="held-out data in the job's data format (.npz or .safetensors)")
    edit.add_argument("--out", type=Path, help="where to write the edited ONNX model (default JOB-EDIT.onnx)")
    edit.add_argument("--json", action="store_true", help="print the edit as JSON instead of the table")
    client_args(edit)
    edit.set_defaults(handler=cmd_edit)

    report = commands.add_parser("report", help="print the URL of a job's page (open it in a browser)")
    report.add_argument("job_id")
    client_args(report)
    report.set_defaults(handler=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except Exception as exc:
        message, code = _explain(exc, args)
        if message is None:
            raise
        print(f"neuronshap: error: {message}", file=sys.stderr)
        return code


def _explain(exc: Exception, args: argparse.Namespace) -> tuple[str | None, int]:
    """A user's error as one line and an exit status; (None, 0) for a bug, which keeps its traceback.

    The error classes are looked up only in modules already imported, so that
    the HTTP commands never import torch and the local ones never import httpx.
    """
    if isinstance(exc, UsageError):
        return str(exc), EXIT_USER_ERROR
    errors = sys.modules.get("worker.shapley.errors")
    if errors is not None and isinstance(exc, errors.UserInputError):
        return str(exc), EXIT_USER_ERROR
    client = sys.modules.get("neuronshap.client")
    if client is not None and isinstance(exc, client.ServiceError):
        return str(exc), EXIT_USER_ERROR if 400 <= exc.status < 500 else EXIT_JOB_FAILED
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(exc, httpx.TransportError):
        return (
            f"cannot reach the service at {args.url} ({exc}); start it with `neuronshap serve` or pass --url.",
            EXIT_JOB_FAILED,
        )
    return None, 0


def _service_url(url: str) -> str:
    """``host:port`` is taken as ``http://host:port``; any other scheme than http(s) is named as the problem."""
    if "://" not in url:
        url = f"http://{url}"
    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("http", "https") or not url.split("://", 1)[1].strip("/"):
        raise argparse.ArgumentTypeError(f"{url!r} is not an http(s) URL of the service; e.g. {DEFAULT_URL}")
    return url


def _positive_int(text: str) -> int:
    """An option's whole number of at least 1, or argparse's one-line error naming the option."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _prune(text: str) -> dict:
    """``--prune``: a whole number is a count of neurons, anything else a fraction of them in (0, 1]."""
    try:
        return {"count": _positive_int(text)} if text.isdigit() else {"fraction": float(text)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction (0.2) nor a count (5) of neurons") from None


def _option(field: str) -> str:
    """The command-line option of a spec field: ``top_k`` → ``--top-k``."""
    return "--" + field.replace("_", "-")


# Spec fields whose option is not named after the field, and how the spec's messages name metric fields.
_OPTIONS = {"name": "--metric", "metric": "--metric", "class": "--class"}
_METRIC_FIELDS = {"`class`": "--class", "`group`": "--group", "`groups`": "--groups"}


def _spec_from_options(args: argparse.Namespace) -> spec.JobSpec:
    """The job spec the options state; a :class:`UsageError` naming the option for one that makes no sense."""
    given = {name: getattr(args, name) for name in spec.EstimatorSpec.model_fields if getattr(args, name) is not None}
    document = {
        "metric": {"name": args.metric, "class": args.class_, "group": args.group, "groups": args.groups},
        "players": {"layers": args.layers} | ({"ablation": args.ablation} if args.ablation else {}),
        "estimator": given,
    }
    try:
        return spec.JobSpec.model_validate(document)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][-1]) if error["loc"] else "metric"
            message = error["msg"].removeprefix("Value error, ")
            for name, option in _METRIC_FIELDS.items():
                message = message.replace(name, option)
            problems.append(f"{_OPTIONS.get(field) or _option(field)}: {message}")
        raise UsageError("; ".join(problems)) from exc


def _require_files(*paths: Path) -> None:
    for path in paths:
        if not path.is_file():
            raise UsageError(f"{path}: no such file")


def _check_files(args: argparse.Namespace) -> None:
    """The model and data files exist and look like what they claim, from their headers (no torch yet)."""
    from app.core.problems import Problem
    from app.jobs import uploads

    _require_files(args.model, args.data)
    try:
        uploads.model_format(args.model.name, args.model, allow_pickle=True)  # a local file of the user's own
        uploads.data_format(args.data.name, args.data, max_unpacked=1 << 62)
    except Problem as exc:
        raise UsageError(f"{exc.field} file {getattr(args, exc.field or 'model')}: {exc.detail}") from exc


def cmd_estimate(args: argparse.Namespace) -> int:
    started_at = time.monotonic()  # --max-seconds counts from here: importing torch, loading and building included
    job_spec = _spec_from_options(args)
    _check_files(args)
    from worker.process import prepare_process
    from worker.shapley import ranked_neurons, run_summary, run_tmab  # torch loads here, once the input is known good
    from worker.shapley.report import no_evidence_message
    from worker.translate import OutOfTime, build_game

    prepare_process(args.threads if args.threads is not None else get_settings().threads)  # before any parallel op
    try:
        memory_mb = args.activation_memory_mb or get_settings().activation_memory_mb
        game, config = build_game(
            job_spec,
            args.model,
            args.data,
            device=args.device,
            started_at=started_at,
            memory_bytes=None if memory_mb is None else memory_mb << 20,
        )
    except OutOfTime as exc:
        print(
            f"neuronshap: stopped: max_seconds after {time.monotonic() - started_at:.1f}s, while loading and building",
            file=sys.stderr,
        )
        print(f"neuronshap: error: {exc}", file=sys.stderr)
        return EXIT_JOB_FAILED

    interrupted = False

    def on_sigint(signum, frame) -> None:
        nonlocal interrupted
        interrupted = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    bar = ProgressBar(sys.stderr, game.n_players)
    try:
        estimate = run_tmab(
            game,
            config,
            on_progress=bar.update,
            should_stop=lambda: interrupted,
            on_pass=bar.update_pass,
            started_at=started_at,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()

    neurons = ranked_neurons(game, estimate)
    summary = run_summary(game, estimate)
    empty = no_evidence_message(estimate)
    if empty is not None:
        pass  # nothing was measured: no placeholder zeros on stdout for a pipeline to read as values
    elif args.json:
        json.dump(neurons, sys.stdout)
        sys.stdout.write("\n")
    else:
        print_table(neurons, summary, args.limit, bottom_first=config.mode == "bottom")
    print(stop_line(summary), file=sys.stderr)
    for warning in summary["warnings"]:
        if warning != empty:
            print(f"neuronshap: warning: {warning}", file=sys.stderr)
    if empty is not None:
        print(f"neuronshap: error: {empty}", file=sys.stderr)
        return EXIT_JOB_FAILED
    return 0


def _samples(summary: dict) -> str:
    """Iterations, and how many were permutations walked (the rest star coalitions; older results lack it)."""
    walks = summary.get("walks")
    return f"{summary['iterations']} iterations" + (f" ({walks} walks)" if walks is not None else "")


def stop_line(summary: dict) -> str:
    """One line on why and where the run stopped, and what its values rest on."""
    ev = summary["evidence"]
    return (
        f"neuronshap: stopped: {summary['stop_reason']} after {summary['elapsed_s']:.1f}s "
        f"({summary['setup_s']:.1f}s loading and building); {_samples(summary)}, "
        f"{summary['evaluations']} evaluations; {summary['undecided']}/{summary['players']} undecided; "
        f"informative samples per neuron: min {ev['informative_min']}, median {ev['informative_median']}, "
        f"{ev['players_without_information']} neurons with none"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run("neuronshap.server:app", factory=True, host=args.host, port=args.port, log_level="info")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    if args.gpus:
        return _worker_per_gpu(args)
    from worker.tasks import app, settings

    app.worker_main(
        [
            "worker",
            "--pool",
            "solo",
            "--concurrency",
            "1",
            "--queues",
            settings.queue_name,
            "--loglevel",
            "INFO",
            "--hostname",
            f"{args.name}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0


def _worker_per_gpu(args: argparse.Namespace) -> int:
    """One worker process per GPU, each seeing only its own (CUDA is never touched here, in the parent)."""
    children = []
    for gpu in [g.strip() for g in args.gpus.split(",") if g.strip()]:
        env = os.environ | {"CUDA_VISIBLE_DEVICES": gpu}
        cmd = [sys.executable, "-m", "neuronshap", "worker", "--name", f"{args.name}-gpu{gpu}"]
        children.append(subprocess.Popen(cmd, env=env))

    def forward(signum, frame) -> None:
        for child in children:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.core.db import migrate

    migrate()
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from app.core.db import migrate, session_factory
    from app.keys.service import create_key

    migrate()
    with session_factory()() as session:
        try:
            key_id, key = create_key(session, args.tenant, args.name)
        except ValueError as exc:
            print(f"neuronshap: error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
    print(key)
    print(f"key id {key_id} for tenant {args.tenant}: keep the key secret, it is not shown again", file=sys.stderr)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from app.core.db import session_factory
    from app.keys.service import revoke_key

    with session_factory()() as session:
        if not revoke_key(session, args.key_id.removeprefix("nsk_").split("_")[0]):
            print(f"neuronshap: error: no active key with id {args.key_id}", file=sys.stderr)
            return EXIT_USER_ERROR
    print(f"revoked {args.key_id}", file=sys.stderr)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from app.jobs.states import JobState
    from neuronshap.client import Client

    _require_files(args.model, args.data, args.spec)
    client = Client(args.url, args.api_key)
    job = client.submit(args.model, args.data, args.spec.read_text(), args.idempotency_key)
    if not args.wait:
        print(json.dumps(job, indent=2) if args.json else job["id"])
        return 0
    print(f"job {job['id']} {job['state']}", file=sys.stderr)
    state = job["state"]
    shown = 0.0
    for kind, data in client.events(job["id"]):
        if kind == "progress" and time.monotonic() - shown >= 5.0:
            shown = time.monotonic()
            print(
                f"  {data['iterations']} iterations, {data['evaluations']} evaluations, "
                f"{data['players'] - data['undecided']}/{data['players']} decided, {data['elapsed_s']:.1f}s",
                file=sys.stderr,
            )
        elif kind == "state" and data["state"] != state:  # the stream starts with the state already shown
            state = data["state"]
            print(f"job {job['id']} {state}", file=sys.stderr)
        elif kind == "done":
            state = data["state"]
    final = client.job(job["id"])
    if state == JobState.FAILED:
        print(f"neuronshap: job {job['id']} failed: {(final.get('error') or {}).get('detail')}", file=sys.stderr)
        return EXIT_JOB_FAILED
    _print_neurons(client.neurons(job["id"], limit=args.limit), args.json)
    return 0 if state == JobState.SUCCEEDED else EXIT_JOB_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    from neuronshap.client import Client

    print(json.dumps(Client(args.url, args.api_key).job(args.job_id), indent=2))
    return 0


def cmd_neurons(args: argparse.Namespace) -> int:
    from neuronshap.client import Client

    neurons = Client(args.url, args.api_key).neurons(args.job_id, limit=args.limit, order=args.order, layer=args.layer)
    _print_neurons(neurons, args.json)
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    """Start the edit, wait for it, print its before/after figures and write the edited model."""
    from neuronshap.client import Client

    if args.repair is not None and args.data is None:
        raise UsageError("--repair chooses how many neurons to remove by the metric on held-out data: give --data")
    if args.data is not None:
        _require_files(args.data)
    selection: dict
    if args.negative:
        selection = {"negative": True}
    elif args.repair is not None:
        selection = {"repair": {"max_neurons": args.repair}}
    else:
        selection = next({kind: getattr(args, kind)} for kind in ("top", "bottom", "prune") if getattr(args, kind))
    client = Client(args.url, args.api_key)
    edit = client.create_edit(args.job_id, selection, args.data)
    print(f"edit {edit['id']} of job {args.job_id} {edit['state']}", file=sys.stderr)
    edit = client.wait_edit(args.job_id, edit["id"])
    if edit["state"] != "succeeded":
        detail = (edit.get("error") or {}).get("detail")
        print(f"neuronshap: edit {edit['id']} failed: {detail}", file=sys.stderr)
        return EXIT_JOB_FAILED
    out = args.out or Path(f"{args.job_id}-{edit['id']}.onnx")
    out.write_bytes(client.edited_model(args.job_id, edit["id"]))
    if args.json:
        print(json.dumps(edit, indent=2))
    else:
        print_edit(edit)
    print(f"wrote the edited model to {out}", file=sys.stderr)
    return 0


def print_edit(edit: dict) -> None:
    """What was removed, then the metric before and after on each data set, each group's accuracy under it."""
    removed = edit["removed"]
    shown = ", ".join(f"{n['layer']}[{n['index']}]" for n in removed[:12]) + (", …" if len(removed) > 12 else "")
    print(f"removed {len(removed)} neurons ({edit['ablation']}){': ' + shown if shown else ''}")
    print(f"{edit['metric']:<18} {'before':>9} {'after':>9} {'change':>9}")
    for where, label in (("job_data", "job's data"), ("held_out", "held-out data")):
        figures = edit["metrics"].get(where)
        if figures is None:
            continue
        rows = [(label, figures)] + [(f"  group {g} accuracy", f) for g, f in (figures.get("groups") or {}).items()]
        for name, f in rows:
            print(f"{name:<18} {f['before']:>9.4f} {f['after']:>9.4f} {f['after'] - f['before']:>+9.4f}")


def cmd_report(args: argparse.Namespace) -> int:
    """The page's URL, once the job is known to exist. The key is not printed (a terminal's scrollback is no
    place for it): the page asks for it, or reads it from the URL's fragment, ``#key=…``."""
    from neuronshap.client import Client

    job = Client(args.url, args.api_key).job(args.job_id)
    print(f"{args.url.rstrip('/')}/v1/jobs/{job['id']}/report")
    if args.api_key:
        print("the page asks for the API key; or open it with #key=<your key> after the URL", file=sys.stderr)
    return 0


def _print_neurons(neurons: list[dict], as_json: bool) -> None:
    if as_json:
        json.dump(neurons, sys.stdout)
        sys.stdout.write("\n")
        return
    print(f"{'rank':>5} {'layer':<24} {'index':>6} {'value':>10} {'lower':>10} {'upper':>10} {'samples':>8}  status")
    for n in neurons:
        print(
            f"{n['rank']:>5} {n['layer']:<24} {n['index']:>6} {n['value']:>10.5f} {n['lower']:>10.5f} "
            f"{n['upper']:>10.5f} {n['samples']:>8}  {n['status']}"
        )


class ProgressBar:
    """One status line on a terminal (redrawn), or a line every few seconds in a log."""

    def __init__(self, stream: TextIO, players: int, width: int = 24) -> None:
        self.stream, self.players, self.width = stream, players, width
        self.tty = stream.isatty()
        self.last = 0.0
        self.drawn = False

    def update(self, progress) -> None:
        """After a round (a :class:`worker.shapley.Progress`)."""
        est = progress.estimate
        self._draw(progress.undecided, est.iterations, est.evaluations, est.elapsed_s, est.config)

    def update_pass(self, progress) -> None:
        """After a forward pass within a round (a :class:`worker.shapley.PassProgress`)."""
        p = progress
        self._draw(p.undecided, p.iterations, p.evaluations, p.elapsed_s, p.config)

    def _draw(self, undecided: int, iterations: int, evaluations: int, elapsed_s: float, config) -> None:
        now = time.monotonic()
        if now - self.last < (0.1 if self.tty else 5.0):
            return
        self.last = now
        decided = self.players - undecided
        filled = round(self.width * decided / self.players)
        eta = _eta(config, elapsed_s, iterations, evaluations)
        line = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {decided}/{self.players} decided | "
            f"{iterations} iterations | {evaluations} evaluations | {elapsed_s:.1f}s"
            + (f" | eta {eta:.0f}s" if eta is not None else "")
        )
        self.stream.write(f"\r{line}\033[K" if self.tty else line + "\n")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def _eta(config, elapsed_s: float, iterations: int, evaluations: int) -> float | None:
    """Seconds to the nearest budget (as the service's ``eta_s``); None without one."""
    from worker.shapley.report import eta_s

    return eta_s(config, elapsed_s, iterations, evaluations)


def print_table(neurons: list[dict], summary: dict, limit: int, bottom_first: bool) -> None:
    rows = list(reversed(neurons)) if bottom_first else neurons
    game = summary["game"]
    print(
        f"metric {game['metric']['name']}: V(all) = {_fmt(summary['v_full'])}, V(none) = {_fmt(summary['v_empty'])}; "
        f"{summary['players']} neurons, {summary['undecided']} undecided; "
        f"{_samples(summary)}, {summary['evaluations']} evaluations, "
        f"{summary['elapsed_s']:.1f}s; stopped: {summary['stop_reason']}; "
        f"bound {summary['estimator']['bound']}, ablation {game['ablation']}"
    )
    _print_neurons(rows[:limit], as_json=False)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
