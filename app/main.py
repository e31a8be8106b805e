"""The FastAPI application.

:func:`create_app` wires one :class:`Settings` to its adapters: the blob
store, the bus (Redis or memory) and the queue (Celery or a thread). Nothing
in ``app`` imports the worker or torch: the embedded queue runs jobs with the
``run_job`` it is given, which ``neuronshap.server`` (``neuronshap serve``)
wires to the worker's runner.
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
from app.core.queue import RunJob, ThreadQueue, make_queue
from app.jobs import routes as jobs_routes
from app.jobs.recovery import requeue_unfinished
from app.ops import routes as ops_routes
from app.ops.service import measure

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, run_job: RunJob | None = None) -> FastAPI:
    """The app for ``settings``; ``run_job`` runs jobs when there is no broker (the embedded queue)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.migrate_on_start:
            migrate(settings.resolved_database_url)
        bus = make_bus(settings)
        queue = make_queue(settings, bus, run_job)
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
    problems.install(app)
    docs.install(app)
    app.middleware("http")(measure)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.include_router(jobs_routes.router)
    app.include_router(ops_routes.router)
    return app
