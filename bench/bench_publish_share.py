"""Benchmark: the share of a job's time spent publishing its live bounds.

Run from the repository root::

    python -m bench.bench_publish_share            # full run, ~5 min on a 2-core CPU
    python -m bench.bench_publish_share --quick    # tiny budgets: checks that the script works

What is measured, and why
-------------------------
While a job runs, the worker publishes its current estimates and bounds (the
ranked neurons as a live snapshot in Redis, plus ``progress`` and ``bounds``
events on the job's stream) so that clients can watch. That work is taken
from the estimator; the service's target is that it costs under 2% of a
job's time, which is why publication is throttled
(``NEURONSHAP_PUBLISH_INTERVAL_S``, default 1 s: at most one publication per
interval, checked after each round of the estimator).

Jobs run for real: rows are inserted in PostgreSQL (a fresh schema) as the
API inserts them, their uploads put in the blob store, and
``worker.runner.run_job`` runs them in this process against Redis
(database 13, keys under a prefix of this run's own), as a worker does. The
runner times each publication (building the ranked neurons, serialising, the
Redis calls) and records the total as
``publish_s`` in the job's summary; the bus counts the publications (its
``set_live`` calls, one per publication). Two models: the digits CNN (112
neurons) and the wide CNN (1,040 neurons, whose snapshot is ten times
larger); publish intervals 1 s (the default), 0.2 s and 0 (a publication
after every round: the unthrottled worst case).

A publication costs the same whatever the round costs, so its share is
largest when rounds are short. Rounds are long at the start of a job (every
neuron is sampled until it has ``min_samples`` samples) and short after,
once the bandit has decided most neurons. So every job here resumes, through
the runner's own checkpoint path, from a checkpoint taken after a warm-up
(until fewer than half the neurons are undecided), and the default spec is
used with evaluation batches of 16 examples instead of 128: both put the
jobs where publication weighs most, so the shares printed are upper bounds
for a whole job with the default spec.

The runner's own counter could miss costs outside its timed block, so a
cross-check does not use it: the same job (same checkpoint, same seed, a
fixed number of permutations, hence identical computation) runs with
publication off (an interval longer than any run) and on, in turn, and
their wall times and this process's CPU times are compared (CPU time is
less disturbed by other processes on a shared machine). The spread between
the runs with publication off shows how much of a difference is noise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import torch

from app.core.blobs import BlobStore
from app.core.bus import RedisBus
from app.core.config import Settings
from app.core.db import get_engine, migrate, session_factory
from app.jobs.models import Job, JobCheckpoint
from app.jobs.schemas import Progress
from app.jobs.spec import JobSpec
from app.keys.deps import DEFAULT_TENANT
from bench.bench_estimator import machine_lines, out, section, table
from examples.digits import DigitsCNN, WideDigitsCNN, export_onnx, load_digits_split, save_eval_npz, train
from tests.harness.services import REDIS_URL, namespace, postgres_schema
from worker.runner import now, run_job
from worker.shapley import MetricSpec, NeuronGame, TMABConfig, load_data, load_model, run_tmab
from worker.shapley import Progress as RoundProgress

TARGET_SHARE = 0.02
DEFAULT_INTERVAL = Settings.model_fields["publish_interval_s"].default
OFF = 1e9  # an interval longer than any run: the runner never publishes live state
LANES = TMABConfig().lanes  # permutations per round of the estimator


@dataclass(frozen=True)
class Scale:
    name: str
    epochs: dict[str, int]
    wide_width: int  # conv2 channels of the wide CNN (1,024: 1,040 neurons in all)
    eval_examples: int | None  # of the digits test split; None: all 450
    warmup_cap_s: float
    intervals: tuple[float, ...]
    budget_s: float  # each job's time budget after its warm-up checkpoint
    cross_seconds: float  # roughly how long one cross-check run lasts (its permutations are fixed)
    cross_repeats: int


FULL = Scale(
    "full",
    epochs={"digits CNN": 5, "wide CNN": 1},
    wide_width=1024,
    eval_examples=None,
    warmup_cap_s=90.0,
    intervals=(DEFAULT_INTERVAL, 0.2, 0.0),
    budget_s=15.0,
    cross_seconds=4.0,
    cross_repeats=2,
)
QUICK = Scale(
    "quick",
    epochs={"digits CNN": 1, "wide CNN": 1},
    wide_width=64,
    eval_examples=64,
    warmup_cap_s=1.5,
    intervals=(DEFAULT_INTERVAL, 0.2, 0.0),
    budget_s=1.5,
    cross_seconds=1.0,
    cross_repeats=1,
)


class CountingBus(RedisBus):
    """The Redis bus, counting the runner's publications (one ``set_live`` each) and keeping the last snapshot."""

    def __init__(self, url: str, prefix: str) -> None:
        super().__init__(url, prefix)
        self.publications = 0
        self.last_snapshot: dict | None = None

    def set_live(self, job_id: str, snapshot: dict) -> None:
        super().set_live(job_id, snapshot)
        self.publications += 1
        self.last_snapshot = snapshot


@dataclass
class Model:
    label: str
    blob: str
    players: int
    checkpoint: bytes | None  # the warm-up's state; None: no round finished within the warm-up's cap
    warm_iterations: int
    warm_s: float


@dataclass
class Run:
    wall_s: float  # run_job from start to end: loading the model, the estimator, the ablation check, the result
    cpu_s: float  # this process's CPU time (all threads) over the same span: less sensitive to other processes
    estimator_s: float  # the estimator's time in this job (after the checkpoint)
    iterations: int  # permutations in this job (after the checkpoint)
    evaluations: int
    publish_s: float
    publications: int
    snapshot_bytes: int | None


class Bench:
    """One database, blob store and Redis namespace (bus keys of this run's own); a job per call of :meth:`run`."""

    def __init__(self, root: Path, database_url: str, batch_size: int) -> None:
        self.root, self.database_url, self.batch_size = root, database_url, batch_size
        self.store = BlobStore(root / "blobs")
        self.redis_url = REDIS_URL
        self.namespace = namespace()

    def upload(self, path: Path) -> str:
        async def chunks() -> AsyncIterator[bytes]:
            yield path.read_bytes()

        digest, _ = asyncio.run(self.store.put_stream(chunks(), limit=1 << 30))
        return digest

    def warm_up(self, label: str, model_blob: str, data_blob: str, cap_s: float) -> Model:
        """Run the job's game (as the runner builds it) until fewer than half its neurons are undecided."""
        game = NeuronGame(
            load_model(self._linked(model_blob, "onnx")),
            load_data(self._linked(data_blob, "npz")),
            MetricSpec("accuracy"),
            batch_size=self.batch_size,
        )
        last: list[RoundProgress] = []

        def on_progress(progress: RoundProgress) -> None:
            last[:] = [progress]

        run_tmab(
            game,
            TMABConfig(max_seconds=cap_s),
            on_progress=on_progress,
            should_stop=lambda: bool(last) and last[0].undecided < game.n_players / 2,
        )
        if not last:
            return Model(label, model_blob, game.n_players, None, 0, 0.0)
        estimate = last[0].estimate
        return Model(label, model_blob, game.n_players, last[0].checkpoint(), estimate.iterations, estimate.elapsed_s)

    def _linked(self, blob: str, suffix: str) -> Path:
        """The loaders read the format from the file name; blobs are stored by hash alone (as the runner does)."""
        path = self.root / f"{blob}.{suffix}"
        if not path.exists():
            path.symlink_to(self.store.path(blob).resolve())
        return path

    def run(self, model: Model, data_blob: str, interval: float, budget: dict) -> Run:
        """A job resumed from the model's warm-up checkpoint; ``budget`` counts from the checkpoint."""
        settings = Settings(
            data_dir=self.root,
            database_url=self.database_url,
            redis_url=self.redis_url,
            blob_dir=self.store.root,
            publish_interval_s=interval,
            **self.namespace.settings(),
        )
        estimator = {"batch_size": self.batch_size}
        if "max_seconds" in budget:
            estimator["max_seconds"] = model.warm_s + budget["max_seconds"]
        if "max_iterations" in budget:
            estimator["max_iterations"] = model.warm_iterations + budget["max_iterations"]
        spec = JobSpec.model_validate({"metric": {"name": "accuracy"}, "estimator": estimator})
        job_id = f"j_{secrets.token_hex(10)}"
        with session_factory(self.database_url)() as session:
            session.add(
                Job(
                    id=job_id,
                    tenant=DEFAULT_TENANT,
                    state="queued",
                    name=None,
                    spec=spec.model_dump(mode="json", by_alias=True),
                    model_blob=model.blob,
                    model_format="onnx",
                    data_blob=data_blob,
                    data_format="npz",
                    created_at=now(),
                    progress=Progress().model_dump(),
                    cancel_requested=False,
                )
            )
            if model.checkpoint is not None:
                session.add(
                    JobCheckpoint(
                        job_id=job_id, state=model.checkpoint, iterations=model.warm_iterations, saved_at=now()
                    )
                )
            session.commit()
        bus = CountingBus(self.redis_url, settings.redis_prefix)
        t, cpu = time.perf_counter(), time.process_time()
        state = run_job(job_id, settings, bus)
        wall_s, cpu_s = time.perf_counter() - t, time.process_time() - cpu
        with session_factory(self.database_url)() as session:
            job = session.get(Job, job_id)
            if state != "succeeded":
                raise RuntimeError(f"job {job_id} ended {state}: {job.error}")
            summary = job.summary
        size = len(json.dumps(bus.last_snapshot)) if bus.last_snapshot is not None else None
        return Run(
            wall_s,
            cpu_s,
            summary["elapsed_s"] - model.warm_s,
            summary["iterations"] - model.warm_iterations,
            summary["evaluations"],
            summary["publish_s"],
            bus.publications,
            size,
        )


def write_models(root: Path, scale: Scale) -> tuple[dict[str, Path], Path, dict[str, float]]:
    """Each model trained (seeded) and exported to ONNX, the evaluation set, and each model's accuracy on it."""
    x_tr, y_tr, x_te, y_te = load_digits_split()
    if scale.eval_examples is not None:
        x_te, y_te = x_te[: scale.eval_examples], y_te[: scale.eval_examples]
    paths, accuracy = {}, {}
    for label, build in (("digits CNN", DigitsCNN), ("wide CNN", lambda: WideDigitsCNN(scale.wide_width))):
        torch.manual_seed(0)
        model = train(build(), x_tr, y_tr, epochs=scale.epochs[label])
        with torch.no_grad():
            accuracy[label] = (model(x_te).argmax(1) == y_te).float().mean().item()
        paths[label] = root / f"{label.replace(' ', '_')}.onnx"
        export_onnx(model, paths[label], x_te[:2])
    data = root / "digits_eval.npz"
    save_eval_npz(data, x_te, y_te)
    return paths, data, accuracy


def interval_label(interval: float) -> str:
    if interval >= OFF:
        return "off"
    if interval == 0:
        return "0 (every round)"
    return f"{interval:g}" + (" (default)" if interval == DEFAULT_INTERVAL else "")


def percent(part: float, whole: float) -> float | None:
    return 100 * part / whole if whole > 0 else None


def share_table(bench: Bench, models: list[Model], data_blob: str, scale: Scale) -> dict[str, float]:
    """The main table; returns each model's permutations per second of estimator time at the default interval."""
    section(f"Time spent publishing: each job runs {scale.budget_s:g} s of estimator time past its checkpoint")
    rows, rates, default_shares = [], {}, []
    for m in models:
        for interval in scale.intervals:
            r = bench.run(m, data_blob, interval, {"max_seconds": scale.budget_s})
            if interval == DEFAULT_INTERVAL:
                rates[m.label] = r.iterations / r.estimator_s if r.estimator_s > 0 else 0.0
                default_shares.append(r.publish_s / r.estimator_s if r.estimator_s > 0 else 0.0)
            rows.append(
                [
                    m.label,
                    interval_label(interval),
                    r.wall_s,
                    r.estimator_s,
                    r.iterations,
                    r.estimator_s / (r.iterations / LANES) if r.iterations else None,
                    r.publications,
                    r.publish_s,
                    percent(r.publish_s, r.wall_s),
                    percent(r.publish_s, r.estimator_s),
                    1000 * r.publish_s / r.publications if r.publications else None,
                    r.snapshot_bytes / 1024 if r.snapshot_bytes else None,
                ]
            )
    table(
        [
            "model",
            "interval (s)",
            "job wall (s)",
            "estimator (s)",
            "permutations",
            "s/round",
            "publications",
            "publishing (s)",
            "share of job (%)",
            "share of estimator (%)",
            "ms/publication",
            "snapshot (KiB)",
        ],
        rows,
    )
    worst = max(default_shares)
    out(
        f"Target: publishing < {TARGET_SHARE:.0%} of a job's time at the default interval ({DEFAULT_INTERVAL:g} s): "
        f"{'MET' if worst < TARGET_SHARE else 'NOT MET'} here; the largest share at the default interval is "
        f"{worst:.2%} of the estimator's time (a job's wall time also holds loading the model and the ablation check)."
    )
    return rates


def cross_check(bench: Bench, models: list[Model], data_blob: str, scale: Scale, rates: dict[str, float]) -> None:
    intervals = (OFF, *[i for i in (DEFAULT_INTERVAL, 0.0) if i in scale.intervals])
    section(
        f"Cross-check: job wall and CPU time with publication off and on; same checkpoint, seed and permutations; "
        f"{scale.cross_repeats} run(s) each, in turn (the order reversed every other time)"
    )
    rows, notes = [], []
    for m in models:
        iterations = max(LANES, int(rates[m.label] * scale.cross_seconds) // LANES * LANES)
        runs: dict[float, list[Run]] = {i: [] for i in intervals}
        for repeat in range(scale.cross_repeats):  # off, on, …, then in reverse: a steady drift cancels out
            for interval in intervals if repeat % 2 == 0 else intervals[::-1]:
                runs[interval].append(bench.run(m, data_blob, interval, {"max_iterations": iterations}))
        evaluations = {r.evaluations for rs in runs.values() for r in rs}
        off_wall, off_cpu = mean(r.wall_s for r in runs[OFF]), mean(r.cpu_s for r in runs[OFF])
        for interval, rs in runs.items():
            wall, cpu = mean(r.wall_s for r in rs), mean(r.cpu_s for r in rs)
            rows.append(
                [
                    m.label,
                    interval_label(interval),
                    iterations,
                    ", ".join(f"{r.wall_s:.2f}" for r in rs),
                    wall - off_wall,
                    ", ".join(f"{r.cpu_s:.2f}" for r in rs),
                    cpu - off_cpu,
                    mean(r.publications for r in rs),
                    mean(r.publish_s for r in rs),
                ]
            )
        same = "identical" if len(evaluations) == 1 else f"NOT identical ({sorted(evaluations)})"
        if scale.cross_repeats > 1:
            wall_spread = max(r.wall_s for r in runs[OFF]) - min(r.wall_s for r in runs[OFF])
            cpu_spread = max(r.cpu_s for r in runs[OFF]) - min(r.cpu_s for r in runs[OFF])
            noise = (
                f"the runs with publication off differ by {wall_spread:.2f} s wall "
                f"({percent(wall_spread, off_wall):.1f}%) "
                f"and {cpu_spread:.2f} s CPU ({percent(cpu_spread, off_cpu):.1f}%) from each other: "
                "differences below that are noise"
            )
        else:
            noise = "one run each: no noise estimate"
        notes.append(f"{m.label}: work {same} across runs ({min(evaluations):,} evaluations in all); {noise}.")
    table(
        [
            "model",
            "interval (s)",
            "permutations",
            "job wall per run (s)",
            "wall minus off (s)",
            "job CPU per run (s)",
            "CPU minus off (s)",
            "publications",
            "runner's publishing (s)",
        ],
        rows,
    )
    for note in notes:
        out(note)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks that the benchmark still runs")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per evaluation batch (default 16)")
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL

    section(f"Publication share benchmark ({scale.name} scale)")
    for line in machine_lines():
        out(line)
    out(
        "Jobs run in this process; PostgreSQL and Redis run on the same machine, and other processes may share "
        "its CPUs."
    )
    with (
        tempfile.TemporaryDirectory(prefix="bench-publish-") as tmp,
        postgres_schema() as database_url,
        contextlib.ExitStack() as cleanup,
    ):
        root = Path(tmp)
        migrate(database_url)
        t = time.monotonic()
        paths, data, accuracy = write_models(root, scale)
        out(
            f"trained and exported in {time.monotonic() - t:.1f} s; eval set: "
            f"{scale.eval_examples or 'all 450'} test examples, batches of {args.batch_size}"
        )
        bench = Bench(root, database_url, args.batch_size)
        cleanup.callback(bench.namespace.drop)
        data_blob = bench.upload(data)
        models = []
        for label, path in paths.items():
            m = bench.warm_up(label, bench.upload(path), data_blob, scale.warmup_cap_s)
            models.append(m)
            out(
                f"{label}: {m.players:,} neurons, {scale.epochs[label]} epochs, accuracy {accuracy[label]:.3f}; "
                f"warm-up checkpoint after {m.warm_iterations} permutations, {m.warm_s:.1f} s"
                + ("" if m.checkpoint else " (no round finished: its jobs start afresh)")
            )
        rates = share_table(bench, models, data_blob, scale)
        cross_check(bench, models, data_blob, scale, rates)
        get_engine(database_url).dispose()  # its connections would hold the schema that is dropped next
    out()
    out(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
