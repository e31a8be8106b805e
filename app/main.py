"""The FastAPI application.

:func:`create_app` wires one :class:`Settings` to its adapters: the blob
store, the bus (Redis or memory) and the queue (Celery or a thread). Nothing
in ``app`` imports the worker or torch: the embedded queue runs jobs with the
``run_job`` it is given, and submissions are checked (model loads, takes the
data, fits the spec) by the ``check_upload`` it is given; ``neuronshap.server``
(``neuronshap serve``) wires both to the worker.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.core import docs, problems
from app.core.blobs import BlobStore
from app.core.bus import make_bus
from app.core.config import Settings, get_settings
from app.core.db import migrate
from app.core.limits import BodyLimit
from app.core.queue import RunEdit, RunJob, ThreadQueue, make_queue
from app.edits import routes as edits_routes
from app.jobs import routes as jobs_routes
from app.jobs.recovery import requeue_unfinished
from app.jobs.uploads import CheckUpload
from app.ops import routes as ops_routes
from app.ops.service import measure
from app.reports import routes as reports_routes

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    run_job: RunJob | None = None,
    check_upload: CheckUpload | None = None,
    run_edit: RunEdit | None = None,
) -> FastAPI:
    """The app for ``settings``; ``run_job`` and ``run_edit`` run jobs and edits when there is no broker (the
    embedded queue); ``check_upload`` checks each submission before it is answered (without one, the worker is
    the first to load the model)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.migrate_on_start:
            migrate(settings.resolved_database_url)
        bus = make_bus(settings)
        queue = make_queue(settings, bus, run_job, run_edit)
        app.state.bus, app.state.queue = bus, queue
        if isinstance(queue, ThreadQueue):  # the embedded queue lives in this process: resume what it left
            requeue_unfinished(settings, queue, bus)
        yield
        if isinstance(queue, ThreadQueue):
            queue.shutdown()

    app = FastAPI(
        title="neuronshap",
        version="1.0",
        summary="Which neurons of a trained network carry a metric: TMAB-Shapley values with confidence bounds.",
        lifespan=lifespan,
        docs_url=None,  # served by app.core.docs, without a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.store = BlobStore(settings.resolved_blob_dir)
    app.state.check_upload = check_upload
    problems.install(app)
    docs.install(app)
    app.middleware("http")(measure)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.include_router(jobs_routes.router)
    app.include_router(edits_routes.router)
    app.include_router(ops_routes.router)
    app.include_router(reports_routes.router)
    return app
