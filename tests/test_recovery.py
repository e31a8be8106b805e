"""Nothing lost: a worker killed mid-job, a job saved but never queued, a job delivered twice.

Real processes: PostgreSQL, Redis and ``neuronshap worker`` processes, one of
which is killed with SIGKILL in the middle of a job.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import select, update

from app.core.bus import MemoryBus
from app.core.config import Settings
from app.core.db import session_factory
from app.core.queue import CeleryQueue
from app.jobs.models import Job, JobCheckpoint
from app.jobs.recovery import reconcile
from tests.harness import stacks
from tests.harness.jobs import exact_run, submit
from worker.runner import run_job

RECOVER_FAST = {
    "lease_s": 2.0,
    "reconcile_interval_s": 0.5,
    "requeue_after_s": 1.0,
    "checkpoint_interval_s": 0.2,
    "publish_interval_s": 0.1,
}
SPEC = exact_run(5, max_iterations=800)


@pytest.fixture
def cluster(tmp_path):
    """PostgreSQL + Redis (this stack's namespace) + an API in this process; workers are started by the test."""
    with stacks.full(tmp_path, worker=False, **RECOVER_FAST) as stack:
        yield stack


def checkpoint_iterations(settings: Settings, job_id: str) -> int | None:
    with session_factory(settings.resolved_database_url)() as session:
        row = session.get(JobCheckpoint, job_id)
        return None if row is None else row.iterations


@pytest.mark.service
@pytest.mark.slow
def test_a_job_whose_worker_is_killed_resumes_on_another_and_ends_as_if_uninterrupted(cluster, tiny_cnn, tmp_path):
    env = stacks.settings_env(cluster.settings)
    log = open(tmp_path / "worker-a.log", "wb")
    first = subprocess.Popen(
        [sys.executable, "-m", "neuronshap", "worker", "--name", "a"],
        cwd=stacks.ROOT,
        env=os.environ | env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        job = submit(cluster.client, tiny_cnn, SPEC)
        for _ in range(600):
            saved_at = checkpoint_iterations(cluster.settings, job["id"])
            if saved_at and saved_at >= 100:
                break
            time.sleep(0.05)
        assert saved_at and saved_at < 800, "the job should have a checkpoint and be mid-run"
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    assert cluster.client.get(f"/v1/jobs/{job['id']}").json()["state"] == "running"  # as the dead worker left it

    with stacks.worker_process(cluster.settings, cluster.worker_log):
        resumed = cluster.wait(job["id"], ("succeeded", "failed"), timeout=180)
        assert resumed["state"] == "succeeded" and resumed["progress"]["iterations"] == 800
        assert resumed["summary"]["resumed_from_iteration"] >= saved_at  # from the checkpoint, not from zero
        fresh = submit(cluster.client, tiny_cnn, SPEC)
        cluster.wait(fresh["id"], ("succeeded",), timeout=180)
    a = cluster.client.get(f"/v1/jobs/{job['id']}/neurons").json()["items"]
    b = cluster.client.get(f"/v1/jobs/{fresh['id']}/neurons").json()["items"]
    assert a == b  # same seed, same values, bounds and samples as the uninterrupted run


@pytest.mark.service
def test_a_job_saved_but_never_queued_is_sent_by_the_reconciler(cluster, tiny_cnn):
    template = submit(cluster.client, tiny_cnn, SPEC | {"estimator": {"top_k": 3, "max_iterations": 8, "seed": 1}})
    with session_factory(cluster.settings.resolved_database_url)() as session:
        source = session.get(Job, template["id"])
        # As if the API died right after its commit: a queued job, recorded as sent, that no message announces.
        orphan = Job(
            id="j_orphan",
            tenant=source.tenant,
            state="queued",
            name=None,
            spec=source.spec,
            model_blob=source.model_blob,
            model_format=source.model_format,
            data_blob=source.data_blob,
            data_format=source.data_format,
            created_at=datetime.now(UTC),
            enqueued_at=datetime.now(UTC),
            progress=source.progress,
            cancel_requested=False,
        )
        session.add(orphan)
        session.commit()
    with stacks.worker_process(cluster.settings, cluster.worker_log):
        orphaned = cluster.wait("j_orphan", ("succeeded", "failed"), timeout=120)
        assert orphaned["state"] == "succeeded", orphaned["error"]
        assert cluster.wait(template["id"], ("succeeded", "failed"), timeout=120)["state"] == "succeeded"


@pytest.mark.service
def test_the_reconciler_sends_again_only_jobs_whose_message_is_not_in_the_queue(cluster, tiny_cnn):
    """A deep queue is not a lost message: resending every job that waits longer than REQUEUE_AFTER_S would flood
    the queue with duplicates (each resent again and again while it waits)."""
    queue = CeleryQueue(cluster.settings.broker_url, cluster.settings.queue_name)
    waiting = [submit(cluster.client, tiny_cnn, SPEC)["id"] for _ in range(3)]  # no worker: their messages wait
    lost = submit(cluster.client, tiny_cnn, SPEC)["id"]
    broker = redis.Redis.from_url(cluster.settings.broker_url)
    broker.lrem(cluster.settings.queue_name, 1, _message_of(cluster.settings, lost))
    assert queue.waiting() == set(waiting)
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    with session_factory(cluster.settings.resolved_database_url)() as session:
        session.execute(update(Job).values(enqueued_at=long_ago))
        session.commit()
    assert reconcile(cluster.settings, queue, MemoryBus()) == [lost]
    assert queue.waiting() == {*waiting, lost}
    assert reconcile(cluster.settings, queue, MemoryBus()) == []  # sent once, not again at every round


def _message_of(settings: Settings, job_id: str) -> bytes:
    return next(
        m
        for m in redis.Redis.from_url(settings.broker_url).lrange(settings.queue_name, 0, -1)
        if job_id.encode() in base64.b64decode(json.loads(m)["body"])
    )


def test_a_second_delivery_of_a_running_job_does_not_run_it(tmp_path, tiny_cnn):
    with stacks.embedded(tmp_path) as stack:
        job = submit(
            stack.client, tiny_cnn, SPEC | {"estimator": {"mode": "all", "half_width": 1e-6, "max_seconds": 120}}
        )
        stack.wait(job["id"], ("running",))
        assert run_job(job["id"], stack.settings, MemoryBus()) is None  # the lease is held: this copy skips
        with session_factory(stack.settings.resolved_database_url)() as session:
            owner = session.scalar(select(Job.lease_owner).where(Job.id == job["id"]))
        assert owner and str(os.getpid()) in owner
        stack.client.post(f"/v1/jobs/{job['id']}/cancel")
        assert stack.wait(job["id"], ("cancelled",), timeout=30)["state"] == "cancelled"


@pytest.mark.service
def test_cancelling_a_job_with_partial_estimates_keeps_them_whatever_became_of_its_worker(cluster, tiny_cnn):
    """Partial estimates live in a job's checkpoint. Cancelled while queued after its worker shut down, or left
    cancelling by a worker that died, such a job goes to a worker that stores those estimates and ends it; a job
    with nothing saved ends at once. Either way no checkpoint outlives the job's end."""
    settings = cluster.settings
    # Far more permutations than a second runs (800 can end within it on an idle machine): stopped mid-run.
    endless = {**SPEC, "estimator": SPEC["estimator"] | {"max_iterations": 10**6}}
    handed_back, abandoned, bare = (submit(cluster.client, tiny_cnn, endless)["id"] for _ in range(3))
    for job_id in (handed_back, abandoned):
        started = time.monotonic()
        assert (
            run_job(job_id, settings, MemoryBus(), should_exit=lambda started=started: time.monotonic() - started > 1)
            == "queued"
        )
    saved = {job_id: checkpoint_iterations(settings, job_id) for job_id in (handed_back, abandoned)}
    assert all(0 < n < 10**6 for n in saved.values()), saved

    assert cluster.client.post(f"/v1/jobs/{handed_back}/cancel").json()["state"] == "cancelling"
    with session_factory(settings.resolved_database_url)() as session:  # as a worker that died while cancelling
        session.execute(
            update(Job)
            .where(Job.id.in_((abandoned, bare)))
            .values(
                state="cancelling",
                cancel_requested=True,
                lease_owner="dead",
                lease_expires_at=datetime.now(UTC) - timedelta(seconds=1),
            )
        )
        session.commit()
    redis.Redis.from_url(settings.broker_url).delete(settings.queue_name)  # the messages went with the dead worker
    sent = reconcile(settings, CeleryQueue(settings.broker_url, settings.queue_name), MemoryBus())
    assert abandoned in sent and bare not in sent
    assert cluster.client.get(f"/v1/jobs/{bare}").json()["state"] == "cancelled"

    for job_id in (handed_back, abandoned):
        assert run_job(job_id, settings, MemoryBus()) == "cancelled"
        job = cluster.client.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "cancelled" and job["progress"]["iterations"] == saved[job_id]
        neurons = cluster.client.get(f"/v1/jobs/{job_id}/neurons").json()["items"]
        assert neurons and all(n["samples"] == saved[job_id] for n in neurons)
    assert all(checkpoint_iterations(settings, job_id) is None for job_id in (handed_back, abandoned, bare))
