"""Benchmark: the jobs API under many concurrent clients polling jobs and reading neurons.

Run from the repository root::

    python -m bench.bench_api_load            # full run, ~3 min on a 2-core CPU
    python -m bench.bench_api_load --quick    # a few seconds per configuration: checks that the script works

What is measured, and why
-------------------------
Pipelines poll jobs and read their ranked neurons far more often than they
submit anything, so the read path is what has to hold up under many clients.
Reads take two different paths in the service: a *running* job is answered
from its live state on the bus (Redis, or memory in the embedded default),
a *finished* one from the database. Both are measured, on the two
deployments the service supports, in one run:

* **full stack**: PostgreSQL (a fresh schema), Redis (database 13, a queue
  and key prefix of this run's own) as broker and bus, one Celery worker
  process;
* **embedded default**: SQLite and the in-process bus and queue; the job runs
  on a thread of the API process itself.

In each, the real API runs as its own process (``neuronshap serve``: one
uvicorn process, the default), with a few finished jobs (small budgets) and
one long job that keeps running (and publishing its live bounds) during the
whole measurement, as in production, where the worker computes while clients
poll. Its CPU use is part of what the API competes with, and is printed.

The load is closed-loop: each of N clients (default 32, one asyncio loop,
``httpx.AsyncClient`` with a connection each) sends its next request as soon
as the previous one is answered, picking uniformly among: the running job,
a finished job, the running job's neurons, a finished job's neurons (both
``limit=100``), and the job list (``limit=20``). Requests sent during a
warm-up are not counted; the table covers a fixed window after it. Latency
is measured by the client, from sending to the whole body read, so it
includes queueing in the server. Any answer other than 2xx counts as an
error, and a run with errors exits with status 1.

The load generator, the API, the worker, PostgreSQL and Redis all share this
machine's CPUs (and other processes may too): the figures are what one small
box does, not what the API alone could do. The CPU each process used during
the window is printed to show which one was the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from app.core.config import Settings
from app.core.db import migrate
from bench.bench_estimator import machine_lines, out, section, table
from examples.digits import DigitsCNN, export_onnx, load_digits_split, save_eval_npz, train
from neuronshap.client import Client
from tests.harness.services import full_settings, namespace, postgres_schema
from tests.harness.stacks import api_process, settings_env, worker_process

LONG_SPEC = {
    "metric": {"name": "accuracy"},
    "estimator": {"mode": "all", "half_width": 1e-6, "truncation": 0, "max_seconds": 600},
}
KINDS = ("job (running)", "job (finished)", "neurons (running)", "neurons (finished)", "list jobs")
HEADERS = ["request", "requests", "req/s", "p50 (ms)", "p90 (ms)", "p99 (ms)", "max (ms)", "errors", "bytes/answer"]


@dataclass(frozen=True)
class Scale:
    name: str
    epochs: int
    eval_examples: int | None  # of the digits test split; None: all 450
    finished_jobs: int
    finished_iterations: int
    clients: int
    warmup_s: float
    duration_s: float


FULL = Scale(
    "full",
    epochs=5,
    eval_examples=None,
    finished_jobs=3,
    finished_iterations=8,
    clients=32,
    warmup_s=3.0,
    duration_s=30.0,
)
QUICK = Scale(
    "quick", epochs=1, eval_examples=64, finished_jobs=1, finished_iterations=4, clients=4, warmup_s=0.5, duration_s=2.0
)


@dataclass
class Deployment:
    label: str
    url: str
    server: subprocess.Popen
    worker: subprocess.Popen | None  # None: the job runs inside the API process
    server_log: Path


@dataclass
class Targets:
    running: str
    finished: list[str]


@dataclass
class Window:
    """What the clients saw during the measured window, and the CPU each process used meanwhile."""

    duration_s: float
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    sizes: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in KINDS})
    errors: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    error_examples: list[str] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- fixtures


def write_fixture(directory: Path, scale: Scale) -> tuple[Path, Path]:
    """The digits CNN (112 neurons), briefly trained, as ONNX, and its evaluation set."""
    x_tr, y_tr, x_te, y_te = load_digits_split()
    if scale.eval_examples is not None:
        x_te, y_te = x_te[: scale.eval_examples], y_te[: scale.eval_examples]
    model = train(DigitsCNN(), x_tr, y_tr, epochs=scale.epochs)
    onnx_path, npz_path = directory / "digits_cnn.onnx", directory / "digits_eval.npz"
    export_onnx(model, onnx_path, x_te[:2])
    save_eval_npz(npz_path, x_te, y_te)
    return onnx_path, npz_path


@contextlib.contextmanager
def full_stack(tmp: Path) -> Iterator[Deployment]:
    """The broker queue and bus keys are this run's own (a namespace): a full run and the test suite's quick one
    can share the Redis database without taking each other's jobs."""
    ns = namespace()
    try:
        with postgres_schema() as database_url:
            settings = full_settings(tmp, database_url, ns)
            migrate(database_url)
            with (
                worker_process(settings, tmp / "worker.log") as worker,
                api_process(settings_env(settings), tmp / "api.log") as (url, api),
            ):
                yield Deployment(
                    "full stack: PostgreSQL + Redis + 1 Celery worker process", url, api, worker, tmp / "api.log"
                )
    finally:
        ns.drop()


@contextlib.contextmanager
def embedded_stack(tmp: Path) -> Iterator[Deployment]:
    with api_process(settings_env(Settings(data_dir=tmp)), tmp / "api.log") as (url, api):
        yield Deployment("embedded default: SQLite, in-process bus and job thread", url, api, None, tmp / "api.log")


def wait_for(client: Client, job_id: str, done: Callable[[dict], bool], what: str, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.job(job_id)
        if done(job):
            return job
        if job["state"] in ("failed", "cancelled") or time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} is {job['state']} ({job['error']}), not {what}")
        time.sleep(0.2)


def prepare_jobs(client: Client, model: Path, data: Path, scale: Scale) -> Targets:
    """Finished jobs first (one worker runs one job at a time), then the long one, until its live bounds are up."""
    quick_spec = json.dumps(
        {"metric": {"name": "accuracy"}, "estimator": {"max_iterations": scale.finished_iterations}}
    )
    finished = [client.submit(model, data, quick_spec)["id"] for _ in range(scale.finished_jobs)]
    for job_id in finished:
        wait_for(client, job_id, lambda j: j["state"] == "succeeded", "succeeded")
    running = client.submit(model, data, json.dumps(LONG_SPEC))["id"]
    wait_for(client, running, lambda j: j["state"] == "running" and j["progress"]["iterations"] > 0, "running")
    if not client.neurons(running, limit=1):
        raise RuntimeError(f"job {running} is running but has no live neurons")
    return Targets(running, finished)


# --------------------------------------------------------------------------- load


SERVICES = {"postgres": "PostgreSQL", "redis-server": "Redis"}  # process name -> what it is


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far: of the named processes, of every PostgreSQL and Redis process, and of the whole machine."""
    snapshot = {name: cpu_seconds(pid) for name, pid in pids.items()} | {"load generator": time.process_time()}
    snapshot |= {label: 0.0 for label in SERVICES.values()}
    for entry in Path("/proc").iterdir():
        try:
            label = SERVICES.get((entry / "comm").read_text().strip()) if entry.name.isdigit() else None
            if label is not None:
                snapshot[label] += cpu_seconds(entry.name)
        except OSError:  # the process has just ended
            continue
    busy = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    del busy[3:5]  # idle and iowait
    snapshot["machine"] = sum(busy) / os.sysconf("SC_CLK_TCK")
    return snapshot


def requests_of(targets: Targets) -> list[tuple[str, str, dict]]:
    neurons = {"limit": 100}
    return [
        ("job (running)", f"/v1/jobs/{targets.running}", {}),
        *[("job (finished)", f"/v1/jobs/{j}", {}) for j in targets.finished],
        ("neurons (running)", f"/v1/jobs/{targets.running}/neurons", neurons),
        *[("neurons (finished)", f"/v1/jobs/{j}/neurons", neurons) for j in targets.finished],
        ("list jobs", "/v1/jobs", {"limit": 20}),
    ]


async def load(deployment: Deployment, targets: Targets, clients: int, warmup_s: float, duration_s: float) -> Window:
    by_kind: dict[str, list[tuple[str, dict]]] = {}
    for kind, path, params in requests_of(targets):
        by_kind.setdefault(kind, []).append((path, params))
    window = Window(duration_s)
    pids = {"API server": deployment.server.pid} | ({"worker": deployment.worker.pid} if deployment.worker else {})
    start = time.perf_counter()
    measure_from, end = start + warmup_s, start + warmup_s + duration_s

    async def client(seed: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(seed)
        while (t0 := time.perf_counter()) < end:
            kind = rng.choice(KINDS)
            path, params = rng.choice(by_kind[kind])
            try:
                response = await http.get(path, params=params)
                status, size, failure = response.status_code, len(response.content), response.text[:200]
            except httpx.HTTPError as exc:
                status, size, failure = 0, 0, f"{type(exc).__name__}: {exc}"
            t1 = time.perf_counter()
            if t0 < measure_from:
                continue
            window.latencies[kind].append(t1 - t0)
            window.sizes[kind].append(size)
            if not 200 <= status < 300:
                window.errors[kind] += 1
                if len(window.error_examples) < 5:
                    window.error_examples.append(f"{kind} {path}: {status or 'no answer'} {failure}")

    async def meter() -> None:
        await asyncio.sleep(measure_from - time.perf_counter())
        before = cpu_snapshot(pids)
        await asyncio.sleep(end - time.perf_counter())
        after = cpu_snapshot(pids)
        window.cpu_s = {name: after[name] - before[name] for name in before}

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=deployment.url, limits=limits, timeout=60) as http:
        await asyncio.gather(meter(), *(client(seed, http) for seed in range(clients)))
    return window


def report(window: Window) -> None:
    rows = []
    everything = [lat for kind in KINDS for lat in window.latencies[kind]]
    for kind, latencies, sizes, errors in [
        *((k, window.latencies[k], window.sizes[k], window.errors[k]) for k in KINDS),
        ("all", everything, [s for k in KINDS for s in window.sizes[k]], sum(window.errors.values())),
    ]:
        ms = np.array(latencies) * 1000
        p50, p90, p99 = np.percentile(ms, [50, 90, 99]) if len(ms) else (None, None, None)
        rows.append(
            [
                kind,
                len(ms),
                len(ms) / window.duration_s,
                p50,
                p90,
                p99,
                ms.max() if len(ms) else None,
                errors,
                round(float(np.mean(sizes))) if sizes else None,
            ]
        )
    table(HEADERS, rows)
    used = dict(window.cpu_s)
    machine = used.pop("machine")
    used["all other processes"] = max(0.0, machine - sum(used.values()))
    cores = ", ".join(f"{name} {seconds / window.duration_s:.0%}" for name, seconds in used.items())
    out(
        f"CPU used during the window (100% = one core): {cores}; the whole machine "
        f"{machine / window.duration_s:.0%} of {os.cpu_count() * 100}% (PostgreSQL and Redis: all their processes, "
        "whoever uses them)"
    )
    out(
        f"API server CPU per answered request: {1000 * window.cpu_s['API server'] / max(1, len(everything)):.1f} ms"
        + (" (with the job thread's)" if "worker" not in window.cpu_s else "")
    )
    for example in window.error_examples:
        out(f"error: {example}")


def measure(deployment: Deployment, model: Path, data: Path, scale: Scale, clients: int, duration_s: float) -> int:
    """Set up the jobs, load the API, print the table; returns the number of errors."""
    section(f"{deployment.label} ({clients} clients, {duration_s:g} s)")
    client = Client(deployment.url)
    t = time.monotonic()
    targets = prepare_jobs(client, model, data, scale)
    out(
        f"fixture jobs: {len(targets.finished)} finished, 1 running (mode all, no truncation); "
        f"ready in {time.monotonic() - t:.1f} s"
    )
    before = client.job(targets.running)["progress"]["iterations"]
    window = asyncio.run(load(deployment, targets, clients, scale.warmup_s, duration_s))
    after = client.job(targets.running)
    report(window)
    if any(window.errors.values()):
        complaints = [
            line
            for line in deployment.server_log.read_text(errors="replace").splitlines()
            if any(word in line for word in ("ERROR", "WARNING", "Traceback", "Error"))
        ]
        out("the API's log, its warnings and errors:" if complaints else "the API's log has no warning or error")
        for line in complaints[-20:]:
            out(f"  {line}")
    out(
        f"the running job stayed {after['state']}; it went from {before} to {after['progress']['iterations']} "
        f"permutations during the warm-up and the window (its live state is published every "
        f"{Settings.model_fields['publish_interval_s'].default:g} s)"
    )
    client.http.post(f"/v1/jobs/{targets.running}/cancel").raise_for_status()
    wait_for(client, targets.running, lambda j: j["state"] == "cancelled", "cancelled", timeout=60)
    return sum(window.errors.values()) + (after["state"] != "running")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds per configuration, few clients")
    parser.add_argument("--clients", type=int, help="concurrent clients (default 32; 4 with --quick)")
    parser.add_argument(
        "--duration", type=float, help="measured seconds per configuration (default 30; 2 with --quick)"
    )
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    clients, duration_s = args.clients or scale.clients, args.duration or scale.duration_s

    section(f"API load benchmark ({scale.name} scale)")
    for line in machine_lines():
        out(line)
    out(
        "The load generator (this process), the API, the worker, PostgreSQL and Redis share these CPUs, "
        "and other processes may too."
    )
    out(
        f"Per configuration: {scale.warmup_s:g} s warm-up, then {duration_s:g} s measured; closed loop, "
        f"{clients} clients; requests picked uniformly among: {', '.join(KINDS)}."
    )
    errors = 0
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        root = Path(tmp)
        t = time.monotonic()
        model, data = write_fixture(root, scale)
        out(f"fixture: digits CNN (112 neurons), {scale.epochs} epochs, written in {time.monotonic() - t:.1f} s")
        for name, stack in (("full", full_stack), ("embedded", embedded_stack)):
            (root / name).mkdir()
            with stack(root / name) as deployment:
                errors += measure(deployment, model, data, scale, clients, duration_s)
    out()
    out(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if errors:
        out(f"FAILED: {errors} error(s) (non-2xx answers, or the long job stopped running)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
