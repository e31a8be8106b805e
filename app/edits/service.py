"""What the edits API does, one function per operation, plain values in and out; the routes only parse and answer.

An edit is checked here as far as the API can without torch, from the job's
stored neurons: the selection's shape, its layers and indices, its counts
against the job's players, ``repair`` without held-out data. Held-out data is
checked like a job's upload (headers, then the submission check with the
job's model and spec, where the service has one); what only running the
model can tell is the worker's to say, as a failed edit. Nothing here changes
the job.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.core import cursors
from app.core.blobs import BlobStore
from app.core.clock import utc
from app.core.config import Settings
from app.core.problems import Problem, not_found
from app.core.queue import Queue
from app.jobs import uploads
from app.jobs.models import Job, JobNeuron
from app.jobs.schemas import PruningPlan
from app.jobs.service import Upload, _forget_blobs, _store_upload, get_job
from app.jobs.spec import JobSpec
from app.jobs.states import JobState

from . import lifecycle, recovery
from .models import Edit
from .schemas import parse_selection


@dataclass(frozen=True)
class _Players:
    """The job's neurons as the API knows them: how many, and each layer's size (indices 0..size-1)."""

    count: int
    layers: dict[str, int]


# --- creating an edit -----------------------------------------------------------------------------------------


async def create_edit(
    session: Session,
    settings: Settings,
    store: BlobStore,
    queue: Queue,
    tenant: str,
    job_id: str,
    selection_text: str,
    data: Upload | None,
    check: uploads.CheckUpload | None = None,
) -> Edit:
    """Check the selection against the job's neurons, store and check the held-out data, record the edit and queue
    it. A refusal leaves nothing behind: the held-out data's blob is deleted unless something else holds it."""
    kind, selection = parse_selection(selection_text)
    job, players = await run_in_threadpool(_editable, session, tenant, job_id)
    _check_selection(kind, selection, players, data is not None)
    held: list[str] = []
    refused = False
    try:
        held_out = None
        if data is not None:
            digest = await _store_upload(store, data, settings.max_data_bytes, "data", held)
            upload = await run_in_threadpool(_check_held_out, settings, store, job, data.filename, digest, check)
            held_out = digest, upload
        return await run_in_threadpool(_record, session, settings, queue, tenant, job, selection, held_out)
    except Problem:
        refused = True
        raise
    finally:
        for digest in held:
            store.unpin(digest)
        if refused:
            await run_in_threadpool(_forget_blobs, session, store, held)


def _editable(session: Session, tenant: str, job_id: str) -> tuple[Job, _Players]:
    """The job, if it has a result to edit (succeeded, or cancelled with estimates), and its players; a 409
    otherwise."""
    job = get_job(session, tenant, job_id)
    rows = session.execute(
        select(JobNeuron.layer, func.max(JobNeuron.index), func.count())
        .where(JobNeuron.job_id == job.id)
        .group_by(JobNeuron.layer)
    ).all()
    session.rollback()  # hold no connection while the held-out data is checked (seconds)
    if job.state not in (JobState.SUCCEEDED, JobState.CANCELLED) or not rows:
        what = "was cancelled before any estimate" if job.state == JobState.CANCELLED else f"is {job.state}"
        hint = {
            JobState.QUEUED: " Wait until it has succeeded (poll GET /v1/jobs/{id}), then edit it.",
            JobState.RUNNING: " Wait until it has succeeded (poll GET /v1/jobs/{id}), then edit it.",
            JobState.CANCELLING: " Wait until it is cancelled; its partial estimates can then be edited.",
        }.get(job.state, " Only a job with estimates can be edited: submit it again.")
        raise Problem(
            409,
            "job-not-editable",
            "Job has no result to edit",
            f"Job {job.id} {what}; an edit acts on a job that has succeeded, or was cancelled with estimates."
            + hint.replace("{id}", job.id),
        )
    return job, _Players(sum(n for _, _, n in rows), {layer: top + 1 for layer, top, _ in rows})


def _check_selection(kind: str, selection: dict, players: _Players, has_data: bool) -> None:
    """What the job's neurons tell about a well-formed selection: it names neurons the job has and counts no more
    than it has; ``repair`` comes with held-out data."""
    arg = selection[kind]
    n = players.count

    def invalid(detail: str, where: str) -> Problem:
        return Problem(422, "invalid-selection", "Invalid selection", detail, field=where)

    def count(value: int, where: str) -> None:
        if value > n:
            raise invalid(f"{where} is {value}, but the job has {n} neurons; ask for 1 to {n}.", where)

    if kind == "neurons":
        seen: set[tuple[str, int]] = set()
        for i, ref in enumerate(arg):
            layer, index = ref["layer"], ref["index"]
            if layer not in players.layers:
                names = ", ".join(sorted(players.layers))
                raise invalid(
                    f"selection.neurons.{i} names layer {layer!r}, which has no neurons in this job; "
                    f"its layers are {names}.",
                    f"selection.neurons.{i}.layer",
                )
            if index >= players.layers[layer]:
                raise invalid(
                    f"selection.neurons.{i} has index {index}; layer {layer!r} has neurons "
                    f"0..{players.layers[layer] - 1}.",
                    f"selection.neurons.{i}.index",
                )
            if (layer, index) in seen:
                raise invalid(f"selection.neurons lists {layer}[{index}] twice; list each once.", "selection.neurons")
            seen.add((layer, index))
    elif kind in ("top", "bottom"):
        count(arg, f"selection.{kind}")
    elif kind == "repair":
        count(arg["max_neurons"], "selection.repair.max_neurons")
        if not has_data:
            raise Problem(
                422,
                "missing-data",
                "Repair needs held-out data",
                "selection.repair chooses how many neurons to remove by the metric on held-out data, which the "
                "estimate never saw; upload it as the `data` file (the job's data format: inputs, labels, and "
                "groups where the metric needs them).",
                field="data",
            )
    elif kind == "prune":
        if arg.get("count") is not None:
            count(arg["count"], "selection.prune.count")
        elif math.floor(arg["fraction"] * n + 1e-9) < 1:
            raise invalid(
                f"selection.prune.fraction {arg['fraction']} of the job's {n} neurons removes none; "
                f"ask for at least {1 / n:.4g}.",
                "selection.prune.fraction",
            )


def _check_held_out(
    settings: Settings,
    store: BlobStore,
    job: Job,
    filename: str | None,
    digest: str,
    check: uploads.CheckUpload | None,
) -> uploads.StoredUpload:
    """The held-out data's format from its headers, then, where the service has a submission check, whether the
    job's model takes it and its metric can be measured on it (the same check a job's upload gets)."""
    path = store.path(digest)
    held_out = uploads.StoredUpload(path, uploads.data_format(filename, path, settings.max_data_bytes), filename)
    if check is not None and settings.preflight_timeout_s > 0:
        model = uploads.StoredUpload(store.path(job.model_blob), job.model_format, f"model.{job.model_format}")
        rejection = check(JobSpec.model_validate(job.spec), model, held_out, settings.preflight_timeout_s)
        if rejection is not None:  # the job's model and spec passed this check once: the held-out data is at fault
            raise Problem(
                422,
                "data-error",
                "Held-out data rejected",
                f"The held-out data does not fit the job: {rejection.detail} Upload examples like the job's data "
                "(the same input shape, labels and groups).",
                field="data",
            )
    return held_out


def _record(
    session: Session,
    settings: Settings,
    queue: Queue,
    tenant: str,
    job: Job,
    selection: dict,
    held_out: tuple[str, uploads.StoredUpload] | None,
) -> Edit:
    """Record the edit (with its held-out data's blob and format) and send it to a worker."""
    digest, upload = held_out if held_out is not None else (None, None)
    edit = lifecycle.new_edit(
        id=f"e_{secrets.token_hex(10)}",
        job_id=job.id,
        tenant=tenant,
        selection=selection,
        data_blob=digest,
        data_format=upload.format if upload is not None else None,
        data_name=upload.filename if upload is not None else None,
    )
    session.add(edit)
    session.commit()
    recovery.send(settings, queue, [edit.id])  # one not sent now is sent by a reconciler
    return edit


# --- reading edits --------------------------------------------------------------------------------------------


def get_edit(session: Session, tenant: str, job_id: str, edit_id: str) -> Edit:
    get_job(session, tenant, job_id)
    edit = session.get(Edit, edit_id)
    if edit is None or edit.job_id != job_id:
        raise not_found("edit", edit_id)
    return edit


def edit_view(edit: Edit) -> dict:
    """The edit as docs/API.md shows it."""
    base = f"/v1/jobs/{edit.job_id}/edits/{edit.id}"
    result = edit.result or {}
    return {
        "id": edit.id,
        "job_id": edit.job_id,
        "state": edit.state,
        "created_at": utc(edit.created_at),
        "started_at": utc(edit.started_at),
        "finished_at": utc(edit.finished_at),
        "selection": edit.selection,
        "metric": result.get("metric"),
        "ablation": result.get("ablation"),
        "removed": result.get("removed"),
        "metrics": result.get("metrics"),
        "curve": result.get("curve"),
        "error": edit.error,
        "links": {
            "self": base,
            "job": f"/v1/jobs/{edit.job_id}",
            "model": f"{base}/model",
            "pruning_plan": f"{base}/pruning-plan",
        },
    }


def list_edits(session: Session, settings: Settings, tenant: str, job_id: str, limit: int, cursor: str | None) -> dict:
    """The job's edits, newest first."""
    get_job(session, tenant, job_id)
    scope = f"edits:{job_id}"
    query = select(Edit).where(Edit.job_id == job_id)
    edits, next_cursor = cursors.newest_first(session, query, Edit, scope, settings.cursor_secret, limit, cursor)
    return {"items": [edit_view(e) for e in edits], "next_cursor": next_cursor}


def _succeeded(edit: Edit, what: str) -> dict:
    if edit.state != JobState.SUCCEEDED or edit.result is None:
        hint = (
            " Poll GET /v1/jobs/{job}/edits/{edit} until it has succeeded."
            if edit.state in (JobState.QUEUED, JobState.RUNNING)
            else " It failed; its error says why."
        )
        raise Problem(
            409,
            "edit-not-ready",
            f"No {what} yet",
            f"The {what} exists once an edit has succeeded; edit {edit.id} is {edit.state}."
            + hint.replace("{job}", edit.job_id).replace("{edit}", edit.id),
        )
    return edit.result


def edited_model(store: BlobStore, edit: Edit) -> tuple[Path, str]:
    """The edited ONNX file's path and the name to download it as."""
    _succeeded(edit, "edited model")
    assert edit.model_blob is not None  # lifecycle.finish writes the result and the model together
    return store.path(edit.model_blob), f"{edit.job_id}-{edit.id}.onnx"


def pruning_plan(edit: Edit) -> PruningPlan:
    """The removed channels per layer, for a structured-pruning tool."""
    return PruningPlan.from_removed(_succeeded(edit, "pruning plan")["removed"])
