"""``/v1/jobs/{id}/edits``: parse the request, call :mod:`app.edits.service`, answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from app.core.db import SessionDep
from app.core.deps import QueueDep, SettingsDep, StoreDep
from app.jobs.routes import ERRORS, _upload
from app.jobs.schemas import Page, PruningPlan
from app.keys.deps import TenantDep

from . import service
from .schemas import EXAMPLES, EditOut

router = APIRouter(prefix="/v1/jobs/{job_id}/edits", tags=["edits"])


@router.post("", status_code=202, response_model=EditOut, responses=ERRORS)
async def create_edit(
    job_id: str,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    queue: QueueDep,
    tenant: TenantDep,
    selection: Annotated[
        str,
        Form(
            description=f"what to remove, as JSON text: one of {EXAMPLES}, or "
            '{"neurons": [{"layer": "conv2", "index": 17}]}'
        ),
    ],
    data: Annotated[
        UploadFile | None,
        File(description="held-out data in the job's data format (.npz or .safetensors); `repair` needs it"),
    ] = None,
) -> dict:
    """Remove neurons from the job's model as its game removes them and measure what that does, on a worker.

    The job must have succeeded (or been cancelled with estimates): else 409. Returns the queued edit; poll its
    `Location` until it has succeeded or failed."""
    edit = await service.create_edit(
        session,
        settings,
        store,
        queue,
        tenant,
        job_id,
        selection,
        _upload(data) if data is not None else None,
        request.app.state.check_upload,
    )
    response.headers["Location"] = f"/v1/jobs/{job_id}/edits/{edit.id}"
    return service.edit_view(edit)


@router.get("", response_model=Page[EditOut], responses=ERRORS)
def list_edits(
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> dict:
    """The job's edits, newest first."""
    return service.list_edits(session, settings, tenant, job_id, limit, cursor)


@router.get("/{edit_id}", response_model=EditOut, responses=ERRORS)
def get_edit(job_id: str, edit_id: str, session: SessionDep, tenant: TenantDep) -> dict:
    """The edit: state, what it removed, the metric before and after, its error."""
    return service.edit_view(service.get_edit(session, tenant, job_id, edit_id))


@router.get(
    "/{edit_id}/model",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS},
)
async def edited_model(
    job_id: str, edit_id: str, session: SessionDep, store: StoreDep, tenant: TenantDep
) -> FileResponse:
    """The edited model as an ONNX file (the upload's inputs and outputs); 409 until the edit has succeeded."""
    edit = await run_in_threadpool(service.get_edit, session, tenant, job_id, edit_id)
    path, filename = service.edited_model(store, edit)
    return FileResponse(path, media_type="application/octet-stream", filename=filename)


@router.get("/{edit_id}/pruning-plan", response_model=PruningPlan, responses=ERRORS)
def pruning_plan(job_id: str, edit_id: str, session: SessionDep, tenant: TenantDep) -> PruningPlan:
    """The removed channels per layer, for a structured-pruning tool (Torch-Pruning); 409 until it has succeeded."""
    return service.pruning_plan(service.get_edit(session, tenant, job_id, edit_id))
