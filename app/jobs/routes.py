"""``/v1/jobs``: parse the request, call :mod:`app.jobs.service`, answer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Header, Query, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from app.core.blobs import CHUNK
from app.core.db import SessionDep
from app.core.deps import BusDep, QueueDep, SettingsDep, StoreDep
from app.core.problems import MEDIA_TYPE
from app.keys.deps import TenantDep

from . import importance, service
from .schemas import JobOut, Neuron, Page
from .states import JobState

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# Typed as FastAPI's `responses=` parameter is (keys int | str): inferred, the dict would be dict[int, ...], and
# dict is invariant in its key type.
PROBLEM: dict[str, Any] = {"content": {MEDIA_TYPE: {}}, "description": "a problem document (RFC 9457)"}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: PROBLEM,
    401: PROBLEM,
    404: PROBLEM,
    409: PROBLEM,
    413: PROBLEM,
    415: PROBLEM,
    422: PROBLEM,
    429: PROBLEM,
    503: PROBLEM,
}


@router.post("", status_code=202, response_model=JobOut, responses=ERRORS)
async def submit_job(
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    queue: QueueDep,
    bus: BusDep,
    tenant: TenantDep,
    model: Annotated[UploadFile, File(description="an ONNX model (.onnx); .pt2 only where the operator allows it")],
    data: Annotated[
        UploadFile, File(description=".npz or .safetensors with `inputs`, `labels` and optionally `groups`")
    ],
    spec: Annotated[
        str,
        Form(
            description="the job spec as JSON text (schema `JobSpec`, docs/API.md); only `metric.name` is required",
            json_schema_extra={
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": "#/components/schemas/JobSpec"},
            },
        ),
    ],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> dict:
    """Start a job: rank the model's neurons for the metric on the data.

    Answered once the model is known to load, take the data and fit the spec (a 422 `model-error`, `data-error`
    or `spec-error` otherwise, and no job).
    """
    job, _ = await service.create_job(
        session,
        settings,
        store,
        queue,
        bus,
        tenant,
        spec,
        _upload(model),
        _upload(data),
        idempotency_key,
        request.app.state.check_upload,
    )
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return await run_in_threadpool(service.job_view, job, bus)  # it may ask Redis: off the event loop


@router.get("", response_model=Page[JobOut], responses=ERRORS)
def list_jobs(
    session: SessionDep,
    settings: SettingsDep,
    bus: BusDep,
    tenant: TenantDep,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> dict:
    """The tenant's jobs, newest first."""
    return service.list_jobs(session, settings, bus, tenant, state, limit, cursor)


@router.get("/{job_id}", response_model=JobOut, responses=ERRORS)
def get_job(job_id: str, session: SessionDep, bus: BusDep, tenant: TenantDep) -> dict:
    """The job: state, progress, error and links."""
    return service.job_view(service.get_job(session, tenant, job_id), bus)


@router.post("/{job_id}/cancel", response_model=JobOut, responses=ERRORS)
def cancel_job(job_id: str, session: SessionDep, bus: BusDep, tenant: TenantDep) -> dict:
    """Ask a queued or running job to stop; idempotent; 409 on a finished job."""
    return service.job_view(service.cancel_job(session, bus, tenant, job_id), bus)


@router.delete("/{job_id}", status_code=204, responses=ERRORS)
def delete_job(job_id: str, session: SessionDep, store: StoreDep, bus: BusDep, tenant: TenantDep) -> Response:
    """Delete a finished job and everything stored for it; 409 while it is active."""
    service.delete_job(session, store, bus, tenant, job_id)
    return Response(status_code=204)


@router.get("/{job_id}/neurons", response_model=Page[Neuron], responses=ERRORS)
def list_neurons(
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    bus: BusDep,
    tenant: TenantDep,
    order: Literal["desc", "asc"] = "desc",
    limit: Annotated[int, Query(ge=1, le=5000)] = 100,
    cursor: str | None = None,
    layer: str | None = None,
) -> dict:
    """The ranked neurons (``desc``: highest value first): live while the job runs, final after."""
    job = service.get_job(session, tenant, job_id)
    return service.list_neurons(session, settings, bus, job, order, limit, cursor, layer)


@router.get("/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}}, **ERRORS})
async def job_events(
    job_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    bus: BusDep,
    tenant: TenantDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    """Server-Sent Events ``progress``, ``bounds``, ``state`` and a last ``done``; resumable with Last-Event-ID."""
    events = await service.job_events(session, settings, bus, tenant, job_id, last_event_id, request.is_disconnected)
    return StreamingResponse(
        _sse(events), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


@router.get("/{job_id}/ablation", responses=ERRORS)
def get_ablation(job_id: str, session: SessionDep, tenant: TenantDep) -> dict:
    """The metric after removing the top 1..K neurons by estimated value, beside removing K random ones."""
    return service.get_ablation(session, service.get_job(session, tenant, job_id))


@router.get("/{job_id}/importance", responses=ERRORS)
def get_importance(job_id: str, session: SessionDep, bus: BusDep, tenant: TenantDep) -> dict:
    """Every neuron's value, bounds and status per layer, in index order: what a pruning tool's importance reads."""
    return importance.importance(session, bus, service.get_job(session, tenant, job_id))


def _upload(file: UploadFile) -> service.Upload:
    async def chunks() -> AsyncIterator[bytes]:
        while chunk := await file.read(CHUNK):
            yield chunk

    return service.Upload(file.filename, chunks())


async def _sse(events: AsyncIterator[service.JobEvent | None]) -> AsyncIterator[str]:
    """Server-Sent Events framing: a reconnect delay, then each event (``None``: a keep-alive comment)."""
    yield "retry: 2000\n\n"
    async for event in events:
        if event is None:
            yield ": keep-alive\n\n"
            continue
        event_id, kind, data = event
        head = f"id: {event_id}\n" if event_id else ""
        yield f"{head}event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
