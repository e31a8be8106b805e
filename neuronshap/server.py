"""The API as ``neuronshap serve`` runs it: the app, with the embedded queue wired to the worker's runners and
submissions checked by the worker's loaders.

``app`` never imports the worker; this is where the two meet. The runner
(and with it torch) is imported when the first job runs, not before, so an
API process that only sends jobs to Celery workers never loads torch. The
submission check (:mod:`worker.preflight`) loads torch only in a child
process of its own, whatever the queue.
Run with ``neuronshap serve`` or ``uvicorn --factory neuronshap.server:app``.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI

from app.core.bus import Bus
from app.core.config import Settings, get_settings
from app.jobs.spec import JobSpec
from app.jobs.uploads import Rejection, StoredUpload
from app.main import create_app


def run_job(job_id: str, settings: Settings, bus: Bus, should_exit: Callable[[], bool]) -> object:
    """The embedded queue's runner: :func:`worker.runner.run_job`, imported on first use."""
    from worker.runner import run_job as run

    return run(job_id, settings, bus, should_exit=should_exit)


def run_edit(edit_id: str, settings: Settings, bus: Bus, should_exit: Callable[[], bool]) -> object:
    """The embedded queue's edit runner: :func:`worker.edit_runner.run_edit_job`, imported on first use."""
    from worker.edit_runner import run_edit_job

    return run_edit_job(edit_id, settings, bus, should_exit=should_exit)


def check_upload(spec: JobSpec, model: StoredUpload, data: StoredUpload, timeout_s: float) -> Rejection | None:
    """The submission check: :func:`worker.preflight.check_upload`, imported on first use (torch, only in its child)."""
    from worker.preflight import check_upload as check

    return check(spec, model, data, timeout_s)


def create_server_app(settings: Settings | None = None) -> FastAPI:
    return create_app(settings or get_settings(), run_job=run_job, check_upload=check_upload, run_edit=run_edit)


def app() -> FastAPI:
    """Factory for uvicorn: settings are read when the server starts, not on import."""
    return create_server_app()
