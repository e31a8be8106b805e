"""Benchmark and check: hundreds of small jobs from many clients against the full stack, one worker killed midway.

Run from the repository root::

    python -m bench.bench_job_load            # 200 jobs, 20 clients, 2 workers (~2 min on a 2-core CPU)
    python -m bench.bench_job_load --quick    # 24 jobs, 6 clients: checks that the script works

What it does, and why
---------------------
The service's promise under load is bookkeeping, not speed: every job a
pipeline submits ends in exactly one terminal state, its result is stored
once, and nothing is left queued or running, even when a worker dies with
jobs in hand. This runs the production shape on one machine (the API as its
own ``neuronshap serve`` process, PostgreSQL in a fresh schema, Redis
database 13 as broker and bus in a queue and key prefix of this run's own,
two ``neuronshap worker`` processes), and:

* N clients, spread over 4 tenants (API keys required), each submit their
  share of the jobs at once and then poll each job until it ends, as an MLOps
  pipeline would (``neuronshap.client.Client``, 1 s between polls);
* the jobs are a mix, by index: most are plain small jobs (they must succeed);
  one in ten is submitted twice with the same ``Idempotency-Key`` (the same
  job must come back); one in ten is cancelled right after submitting, one in
  ten once it runs (both must end ``cancelled``); one in ten asks for a class
  the model does not have (it must be refused at submission, a 422, and no job
  made: the submission check builds the job's game);
* when a third of the jobs have ended, one worker is SIGKILLed in the middle
  of whatever it holds, and a new worker is started a few seconds later. The
  leases are short here (``LEASE_S=3``), so the reconcilers requeue what the
  dead worker held within seconds.

At the end it checks, from PostgreSQL and the workers' logs, and prints:

* every submitted job exists once, and there are no other jobs;
* every job is in the terminal state its kind calls for, and clients saw that
  same state from their first terminal read on (no state ever changed after);
* nothing is stuck: no job queued, running or cancelling, no lease held, no
  checkpoint left;
* results stored once: a succeeded job has one row per neuron (and each
  neuron once), one ablation curve; no job failed;
* each job that a worker started has its end logged exactly once (by the
  worker, or by a reconciler ending a cancellation whose worker died), and
  each tenant's job list holds exactly its own jobs.

Any violation is printed and the run exits with status 1. The figures (jobs
per second, submit and submit-to-end latencies, 429s, what the reconcilers
recovered after the kill, and deliveries the claim skipped) are what this
small box does with the API, both workers, PostgreSQL, Redis and the clients
sharing its CPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import func, select

from app.core.db import migrate, session_factory
from app.jobs.models import Job, JobAblation, JobCheckpoint, JobNeuron
from app.keys.service import create_key
from bench.bench_estimator import machine_lines, out, section, table
from examples.digits import export_onnx, load_digits_split, save_eval_npz, train
from neuronshap.client import Client, ServiceError
from tests.harness.models import TinyCNN, seeded
from tests.harness.services import full_settings, namespace, postgres_schema
from tests.harness.stacks import api_process, settings_env, worker_process

TENANTS = ("alpha", "beta", "gamma", "delta")
TERMINAL = ("succeeded", "failed", "cancelled")
# What each kind of job must end as.
EXPECTED = {
    "plain": "succeeded",
    "retried": "succeeded",
    "cancel-queued": "cancelled",
    "cancel-running": "cancelled",
    "bad-class": "refused",  # at submission: the check builds the job's game, and a class the model lacks is a 422
}
SMALL = {"metric": {"name": "accuracy"}, "estimator": {"top_k": 3, "max_iterations": 6}}
# A run that cannot end by itself before its worker sees a cancel request. A cancelled job must be one of these:
# a worker may claim a job between its 202 and the client's cancel, and a run that ends first (a SMALL one can,
# within one cancel poll) ends as it would have without the request (docs/API.md), so it could not be checked.
LONG = {"metric": {"name": "accuracy"}, "estimator": {"mode": "all", "half_width": 1e-6, "max_seconds": 120}}
SPECS = {
    "plain": SMALL,
    "retried": SMALL,
    "cancel-queued": LONG,
    "cancel-running": LONG,
    "bad-class": {"metric": {"name": "class_recall", "class": 42}, "estimator": {"top_k": 3, "max_iterations": 6}},
}
END_LINE = re.compile(r"job ([0-9a-z_-]+): (succeeded|cancelled|failed)\b")


@dataclass(frozen=True)
class Scale:
    name: str
    jobs: int
    clients: int
    workers: int = 2
    kill_worker: bool = True


FULL = Scale("full", jobs=200, clients=20)
QUICK = Scale("quick", jobs=24, clients=6)


def kind_of(index: int) -> str:
    return {6: "retried", 7: "cancel-queued", 8: "cancel-running", 9: "bad-class"}.get(index % 10, "plain")


@dataclass
class Outcome:
    """One job as its client saw it."""

    index: int
    kind: str
    tenant: str
    job_id: str = ""
    submit_s: float = 0.0
    to_end_s: float = 0.0
    first_terminal: str | None = None
    later_states: set[str] = field(default_factory=set)
    cancel_sent: bool = False
    error: str | None = None


@dataclass
class Run:
    outcomes: list[Outcome]
    wall_s: float
    throttled: int  # 429 answers, each waited out
    killed_at_s: float | None


def write_fixture(directory: Path) -> tuple[Path, Path]:
    """A tiny digits CNN (10 neurons) and 150 evaluation examples: small jobs, so that bookkeeping dominates."""
    x_tr, y_tr, x_te, y_te = load_digits_split()
    model = train(seeded(TinyCNN), x_tr, y_tr, epochs=5)
    onnx_path, npz_path = directory / "tiny_cnn.onnx", directory / "tiny_eval.npz"
    export_onnx(model, onnx_path, x_te[:2])
    save_eval_npz(npz_path, x_te[:150], y_te[:150])
    return onnx_path, npz_path


def submit(client: Client, model: Path, data: Path, spec: dict, key: str | None, throttled: list[int]) -> dict:
    """Submit, waiting out 429s as a pipeline should (``Retry-After``)."""
    while True:
        try:
            return client.submit(model, data, json.dumps(spec), idempotency_key=key)
        except ServiceError as exc:
            if exc.status != 429:
                raise
            throttled.append(1)
            time.sleep(2)


def cancel(client: Client, o: Outcome) -> None:
    answer = client.http.post(f"/v1/jobs/{o.job_id}/cancel")
    o.cancel_sent = True
    if answer.status_code != 200:
        o.error = f"cancel answered {answer.status_code}: {answer.text[:200]}"


def drive(url: str, api_key: str, outcomes: list[Outcome], model: Path, data: Path, throttled: list[int]) -> None:
    """One client: submit its jobs, then follow each to its end (and a few reads beyond)."""
    client = Client(url, api_key=api_key)
    started: dict[int, float] = {}
    for o in outcomes:
        try:
            key = f"load-{o.index}" if o.kind == "retried" else None
            t = time.monotonic()
            if o.kind == "bad-class":
                try:
                    submit(client, model, data, SPECS[o.kind], key, throttled)
                    o.error = "a class the model lacks was accepted (202), not refused (422)"
                except ServiceError as exc:
                    if exc.status == 422:
                        o.submit_s, o.first_terminal = time.monotonic() - t, "refused"
                    else:
                        o.error = f"submit answered {exc.status}, not 422: {exc}"
                continue
            job = submit(client, model, data, SPECS[o.kind], key, throttled)
            o.submit_s, o.job_id, started[o.index] = time.monotonic() - t, job["id"], t
            if o.kind == "retried":  # the pipeline's retry of the same request: the same job, nothing new
                again = submit(client, model, data, SPECS[o.kind], key, throttled)
                if again["id"] != job["id"]:
                    o.error = f"retry with the same Idempotency-Key made a second job {again['id']}"
            if o.kind == "cancel-queued":
                cancel(client, o)
        except Exception as exc:  # recorded, and counted as a violation
            o.error = f"submit: {exc}"
    pending = [o for o in outcomes if o.job_id and o.error is None]
    while pending:
        for o in list(pending):
            try:
                state = client.job(o.job_id)["state"]
            except Exception as exc:
                o.error = f"poll: {exc}"
                pending.remove(o)
                continue
            if o.kind == "cancel-running" and state == "running" and not o.cancel_sent:
                cancel(client, o)
            if o.first_terminal is None and state in TERMINAL:
                o.first_terminal, o.to_end_s = state, time.monotonic() - started[o.index]
            elif o.first_terminal is not None:
                o.later_states.add(state)
                pending.remove(o)  # one read after the end: it must say the same
        time.sleep(1.0)


def run_load(
    url: str,
    keys: dict[str, str],
    model: Path,
    data: Path,
    scale: Scale,
    workers: list,
    start_worker: Callable[[str], subprocess.Popen],
) -> Run:
    outcomes = [Outcome(i, kind_of(i), TENANTS[i % scale.clients % len(TENANTS)]) for i in range(scale.jobs)]
    throttled: list[int] = []
    threads = [
        threading.Thread(
            target=drive,
            args=(
                url,
                keys[TENANTS[c % len(TENANTS)]],
                [o for o in outcomes if o.index % scale.clients == c],
                model,
                data,
                throttled,
            ),
            daemon=True,
        )
        for c in range(scale.clients)
    ]
    t0 = time.monotonic()
    for thread in threads:
        thread.start()
    killed_at = None
    if scale.kill_worker:
        while sum(o.first_terminal is not None for o in outcomes) < scale.jobs // 3:
            if not any(t.is_alive() for t in threads):
                break
            time.sleep(0.2)
        workers[0].send_signal(signal.SIGKILL)
        killed_at = time.monotonic() - t0
        time.sleep(3)
        workers.append(start_worker("worker-replacement"))
    for thread in threads:
        thread.join(timeout=900)
    return Run(outcomes, time.monotonic() - t0, len(throttled), killed_at)


def verify(run: Run, database_url: str, logs: list[Path], url: str, keys: dict[str, str]) -> tuple[list[str], dict]:
    """Every invariant the service promises under load; returns the violations and the counts behind them."""
    problems: list[str] = []
    by_id = {o.job_id: o for o in run.outcomes if o.job_id}
    for o in run.outcomes:
        if o.error:
            problems.append(f"job #{o.index} ({o.kind}): {o.error}")
        elif o.first_terminal != EXPECTED[o.kind]:
            problems.append(f"job #{o.index} ({o.kind}) {o.job_id} ended {o.first_terminal}, not {EXPECTED[o.kind]}")
        if o.later_states - {o.first_terminal}:
            problems.append(f"job {o.job_id} was {o.first_terminal}, later {sorted(o.later_states)}")

    db = session_factory(database_url)
    with db() as session:
        jobs = {j.id: j for j in session.scalars(select(Job))}
        rows = session.execute(select(JobNeuron.job_id, JobNeuron.layer, JobNeuron.index)).all()
        curves = set(session.scalars(select(JobAblation.job_id)))
        checkpoints = session.scalar(select(func.count()).select_from(JobCheckpoint))
    neurons, distinct = Counter(r.job_id for r in rows), Counter(r.job_id for r in set(rows))
    if set(jobs) != set(by_id):
        extra, missing = sorted(set(jobs) - set(by_id))[:5], sorted(set(by_id) - set(jobs))[:5]
        problems.append(f"{len(jobs)} jobs stored for {len(by_id)} submitted; extra {extra}, missing {missing}")
    for job in jobs.values():
        o = by_id.get(job.id)
        if job.state not in TERMINAL or job.lease_owner is not None:
            problems.append(f"job {job.id} stuck: {job.state}, lease {job.lease_owner}")
        elif o is not None and job.state != o.first_terminal:
            problems.append(f"job {job.id} is {job.state} in the database; its client saw {o.first_terminal}")
        players = (job.progress or {}).get("players")
        stored_once = neurons.get(job.id) == distinct.get(job.id) == players and job.id in curves
        if job.state == "succeeded" and not stored_once:
            problems.append(
                f"job {job.id}: {neurons.get(job.id)} neuron rows ({distinct.get(job.id)} distinct) for "
                f"{players} players, ablation curve {job.id in curves}"
            )
        if job.state == "failed":  # no kind of job in this load may fail: a bad spec is refused before it exists
            problems.append(f"job {job.id} failed with {job.error} and {neurons.get(job.id)} neuron rows")
    if checkpoints:
        problems.append(f"{checkpoints} checkpoints left behind")

    texts = [log.read_text(errors="replace") for log in logs]
    ends = Counter(m.group(1) for text in texts for m in END_LINE.finditer(text))
    skipped = sum(text.count("not claimable") for text in texts)
    problems += [f"job {job_id}: its end was logged {n} times" for job_id, n in ends.items() if n > 1]
    ended_by_worker = [j for j in jobs.values() if j.state in ("succeeded", "failed") or j.started_at is not None]
    problems += [f"job {j.id} ({j.state}) ended with no worker logging it" for j in ended_by_worker if j.id not in ends]

    owned = defaultdict(set)
    for o in run.outcomes:
        if o.job_id:
            owned[o.tenant].add(o.job_id)
    for tenant, key in keys.items():
        listed = {j["id"] for j in _all_jobs(url, key)}
        if listed != owned[tenant]:
            problems.append(f"tenant {tenant} lists {len(listed)} jobs, owns {len(owned[tenant])}")
    counts = {
        "stored": len(jobs),
        "states": Counter(j.state for j in jobs.values()),
        "skipped": skipped,
        "requeued": sum(text.count("stopped renewing the lease; requeued") for text in texts),
        "abandoned": sum(text.count("while cancelling") for text in texts),
        "resumed": sum(1 for j in jobs.values() if (j.summary or {}).get("resumed_from_iteration") is not None),
    }
    return problems, counts


def _all_jobs(url: str, key: str) -> list[dict]:
    items, cursor = [], None
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
        while True:
            page = http.get("/v1/jobs", params={"limit": 100} | ({"cursor": cursor} if cursor else {})).json()
            items += page["items"]
            if not (cursor := page.get("next_cursor")):
                return items


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(run: Run, counts: dict, scale: Scale) -> None:
    section("Figures")
    ended = [o for o in run.outcomes if o.first_terminal]
    out(
        f"{len(run.outcomes)} jobs from {scale.clients} clients ({len(TENANTS)} tenants), {scale.workers} workers; "
        f"wall {run.wall_s:.1f} s, {len(ended) / run.wall_s:.2f} jobs/s ended"
    )
    if run.killed_at_s is not None:
        out(f"worker 1 SIGKILLed at {run.killed_at_s:.1f} s, a replacement started 3 s later")
    out()
    rows = []
    for kind in EXPECTED:
        mine = [o for o in run.outcomes if o.kind == kind]
        submit_ms = [o.submit_s * 1000 for o in mine]
        to_end = [o.to_end_s for o in mine if o.first_terminal]
        rows.append(
            [
                kind,
                len(mine),
                EXPECTED[kind],
                sum(o.first_terminal == EXPECTED[kind] for o in mine),
                percentile(submit_ms, 0.5),
                percentile(submit_ms, 0.99),
                percentile(to_end, 0.5),
                percentile(to_end, 0.99),
            ]
        )
    table(
        ["kind", "jobs", "must end", "did", "submit p50 (ms)", "submit p99 (ms)", "to end p50 (s)", "to end p99 (s)"],
        rows,
    )
    states = ", ".join(f"{n} {s}" for s, n in sorted(counts["states"].items()))
    out(f"stored: {counts['stored']} jobs ({states}); 429s waited out: {run.throttled}")
    out(
        f"after the kill: reconcilers requeued {counts['requeued']} job(s) with an expired lease and ended "
        f"{counts['abandoned']} cancellation(s); {counts['resumed']} job(s) resumed from a checkpoint "
        "(a redelivered message may claim an expired lease first)"
    )
    out(f"deliveries skipped by the claim (cancelled while queued, or sent twice): {counts['skipped']}")
    all_ends = [o.to_end_s for o in ended]
    if all_ends:
        out(f"submit to end, all jobs: mean {statistics.fmean(all_ends):.1f} s, max {max(all_ends):.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run that checks the script works")
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--clients", type=int)
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    scale = Scale(scale.name, args.jobs or scale.jobs, args.clients or scale.clients)
    section(f"Job load: {scale.jobs} jobs, {scale.clients} clients, {scale.workers} workers ({scale.name} scale)")
    for line in machine_lines():
        out(line)

    # The broker queue and the bus keys are this run's own (a namespace, dropped at the end): runs beside this one,
    # the test suite's included, keep their jobs.
    ns = namespace()
    with (
        tempfile.TemporaryDirectory(prefix="neuronshap-load-") as tmp_name,
        postgres_schema() as database_url,
        contextlib.ExitStack() as cleanup,
    ):
        cleanup.callback(ns.drop)
        tmp = Path(tmp_name)
        model, data = write_fixture(tmp)
        settings = full_settings(
            tmp,
            database_url,
            ns,
            require_api_keys=True,
            max_active_jobs_per_tenant=scale.jobs,
            lease_s=3,
            reconcile_interval_s=1,
            requeue_after_s=10,
            checkpoint_interval_s=1,
            cancel_poll_s=0.5,
        )
        migrate(database_url)
        with session_factory(database_url)() as session:
            keys = {tenant: create_key(session, tenant)[1] for tenant in TENANTS}
        logs: list[Path] = []

        with contextlib.ExitStack() as stack:
            workers = []
            for i in range(scale.workers):
                logs.append(tmp / f"worker-{i}.log")
                workers.append(stack.enter_context(worker_process(settings, logs[-1])))

            def replacement(name: str):
                logs.append(tmp / f"{name}.log")
                return stack.enter_context(worker_process(settings, logs[-1]))

            url, _ = stack.enter_context(api_process(settings_env(settings), tmp / "api.log"))
            run = run_load(url, keys, model, data, scale, workers, replacement)
            problems, counts = verify(run, database_url, logs, url, keys)
        report(run, counts, scale)
        section("Checks")
        for problem in problems[:50]:
            out(f"VIOLATION: {problem}")
        out(
            "every job ended once, in the state it must; results stored once; nothing stuck"
            if not problems
            else f"{len(problems)} violations"
        )
        return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
