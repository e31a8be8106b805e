"""The Celery side: ``celery -A worker.tasks worker`` (or ``neuronshap worker``) runs jobs and edits sent by the API.

A worker process runs one job at a time in its main process (the ``solo``
pool): nothing is forked after torch is loaded, and a GPU is initialised only
inside the job. Run one worker process per GPU, each with its own
``CUDA_VISIBLE_DEVICES`` (``neuronshap worker --gpus 0,1`` does that).

On a warm shutdown (SIGTERM, or Ctrl-C once) a running job stops at its next
forward pass, saves a checkpoint and is sent back to the queue, so stopping a
worker loses no work and does not wait for a job that may run for hours. A
worker killed outright leaves a lease that expires; every worker runs
:func:`app.jobs.recovery.reconcile` on a timer, which sends such jobs again.
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_ready, worker_shutting_down

from app.core.bus import make_bus
from app.core.config import get_settings
from app.core.queue import TASK_RUN_EDIT, TASK_RUN_JOB, CeleryQueue, celery_app
from app.jobs.recovery import reconcile
from app.jobs.states import JobState
from worker.edit_runner import run_edit_job
from worker.runner import run_job

log = logging.getLogger(__name__)

settings = get_settings()
if not settings.broker_url:
    raise SystemExit(
        "neuronshap worker needs a broker: set NEURONSHAP_BROKER_URL (e.g. redis://localhost:6379/0). "
        "Without one, `neuronshap serve` runs jobs in its own process."
    )
broker_url: str = settings.broker_url  # checked just above; a name of its own keeps it a str in the functions below
app = celery_app(broker_url, settings.queue_name)
_bus = make_bus(settings)
_shutting_down = threading.Event()


@worker_shutting_down.connect
def _on_shutdown(**_: object) -> None:
    _shutting_down.set()


@worker_ready.connect
def _start_reconciler(**_: object) -> None:
    """Every worker looks for jobs to recover (expired leases, lost messages) now and every few seconds."""

    def loop() -> None:
        while not _shutting_down.is_set():
            try:
                reconcile(settings, CeleryQueue(broker_url, settings.queue_name), _bus)
            except Exception as exc:  # the database or broker is away: next time
                log.warning("reconcile failed: %s", exc)
            _shutting_down.wait(settings.reconcile_interval_s)

    threading.Thread(target=loop, name="reconciler", daemon=True).start()


@app.task(name=TASK_RUN_JOB, ignore_result=True)
def run(job_id: str) -> None:
    if run_job(job_id, settings, _bus, should_exit=_shutting_down.is_set) in (JobState.QUEUED, JobState.CANCELLING):
        # Handed back at a checkpoint: the next worker resumes it.
        CeleryQueue(broker_url, settings.queue_name).enqueue(job_id)


@app.task(name=TASK_RUN_EDIT, ignore_result=True)
def edit(edit_id: str) -> None:
    """An edit (seconds): a worker shutting down lets it finish; one killed leaves a lease the reconciler sees."""
    run_edit_job(edit_id, settings, _bus, should_exit=_shutting_down.is_set)
