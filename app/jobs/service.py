"""What the jobs API does, one function per operation; the routes only parse and answer.

The database is the record of every job. While a job runs, its current
estimates, bounds and progress live on the bus (Redis, or memory in the
embedded default), published by the worker; reads of a running job answer
from there, reads of a finished one from the database.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

from pydantic import ValidationError
from sqlalchemy import delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from app.core import cursors
from app.core.blobs import BlobStore, BlobTooLarge
from app.core.bus import Bus, best_effort, valid_event_id
from app.core.clock import utc
from app.core.config import Settings
from app.core.db import UNAVAILABLE, session_factory
from app.core.problems import Problem, field_path, not_found
from app.core.queue import Queue
from app.edits.models import Edit

from . import lifecycle, recovery, uploads
from .models import Job, JobAblation, JobCheckpoint, JobNeuron
from .schemas import Neuron, Progress
from .spec import JobSpec
from .states import ACTIVE, FINISHED, JobState

log = logging.getLogger(__name__)

EVENT_BLOCK_S = 5.0  # a read of the event stream waits this long, then the job's record is checked
JobEvent = tuple[str | None, str, dict]  # (event id, None for one told from the job's record; kind; data)


@dataclass(frozen=True)
class Upload:
    """A file as the request streams it in: the name the client gave it, and its bytes."""

    filename: str | None
    chunks: AsyncIterator[bytes]


# --- creating a job -------------------------------------------------------------------------------------------


def parse_spec(text: str, limit: int) -> JobSpec:
    if len(text.encode()) > limit:
        raise Problem(
            413,
            "too-large",
            "Spec too large",
            f"The spec is over {limit} bytes; it should be a small JSON object.",
            field="spec",
        )
    try:
        return JobSpec.model_validate_json(text)
    except ValidationError as exc:
        errors = exc.errors()
        where = "spec." + field_path(tuple(errors[0].get("loc", ()))) if errors[0].get("loc") else "spec"
        detail = "; ".join(
            (f"spec.{field_path(tuple(e['loc']))}: " if e.get("loc") else "spec: ") + e["msg"] for e in errors
        )
        if errors[0]["type"] == "json_invalid":
            detail = (
                f"The spec is not valid JSON ({errors[0]['msg']}); "
                'send a JSON object such as {"metric": {"name": "accuracy"}}.'
            )
        raise Problem(422, "invalid-spec", "Invalid spec", detail, field=where) from exc


async def _store_upload(store: BlobStore, upload: Upload, limit: int, field: str, held: list[str]) -> str:
    """Store an upload; its digest joins ``held``, the blobs this request pinned (and deletes if it is refused)."""
    try:
        digest, size = await store.put_stream(upload.chunks, limit)
    except BlobTooLarge as exc:
        raise Problem(
            413,
            "too-large",
            "Upload too large",
            f"The {field} file is larger than this service's limit of {exc.limit} bytes.",
            field=field,
        ) from exc
    held.append(digest)
    if size == 0:
        raise Problem(422, "invalid-file", "Invalid file", f"The {field} file is empty.", field=field)
    return digest


def _forget_blob(session: Session, store: BlobStore, digest: str) -> None:
    """Delete a blob no job or edit refers to (a job shares a blob with every other upload of the same bytes, an
    edit's held-out data with a job's data)."""

    def unused() -> bool:
        jobs = select(func.count()).select_from(Job).where(or_(Job.model_blob == digest, Job.data_blob == digest))
        edits = select(func.count()).select_from(Edit).where(or_(Edit.model_blob == digest, Edit.data_blob == digest))
        return not session.scalar(jobs) and not session.scalar(edits)

    store.delete(digest, unused)


def _forget_blobs(session: Session, store: BlobStore, digests: Iterable[str]) -> None:
    for digest in digests:
        _forget_blob(session, store, digest)


async def create_job(
    session: Session,
    settings: Settings,
    store: BlobStore,
    queue: Queue,
    bus: Bus,
    tenant: str,
    spec_text: str,
    model: Upload,
    data: Upload,
    idempotency_key: str | None,
    check: uploads.CheckUpload | None = None,
) -> tuple[Job, bool]:
    """Store the uploads, check them, record the job and queue it. Returns the job and whether it is new.

    ``check`` (where the service has one and ``preflight_timeout_s`` is not 0) is asked whether the model loads,
    takes the data and fits the spec; a refusal is a 422 and no job. Whatever refuses the submission once its
    files are stored deletes them, unless a job or another request of the same bytes holds them. With an
    ``Idempotency-Key``, a retry of the same request returns the job the first one made; the same key with
    another payload is refused.
    """
    spec = parse_spec(spec_text, settings.max_spec_bytes)
    held: list[str] = []
    refused = False
    try:
        model_blob = await _store_upload(store, model, settings.max_model_bytes, "model", held)
        data_blob = await _store_upload(store, data, settings.max_data_bytes, "data", held)
        # What blocks on the database runs in a worker thread, so that a slow database (or a wait for a pooled
        # connection) never stalls the event loop, which every other request, and the release of their
        # connections, goes through.
        model_up, data_up, request_hash, existing = await run_in_threadpool(
            _admit,
            session,
            settings,
            store,
            tenant,
            spec,
            (model.filename, model_blob),
            (data.filename, data_blob),
            idempotency_key,
        )
        if existing is not None:
            return existing, False
        if check is not None and settings.preflight_timeout_s > 0:
            rejection = await run_in_threadpool(check, spec, model_up, data_up, settings.preflight_timeout_s)
            if rejection is not None:
                raise uploads.rejected(rejection)
        return await run_in_threadpool(
            _record_job,
            session,
            settings,
            queue,
            bus,
            tenant,
            spec,
            (model_blob, model_up),
            (data_blob, data_up),
            request_hash,
            idempotency_key,
        )
    except Problem:
        refused = True
        raise
    finally:
        for digest in held:
            store.unpin(digest)
        if refused:
            await run_in_threadpool(_forget_blobs, session, store, held)


def _admit(
    session: Session,
    settings: Settings,
    store: BlobStore,
    tenant: str,
    spec: JobSpec,
    model: tuple[str | None, str],
    data: tuple[str | None, str],
    idempotency_key: str | None,
) -> tuple[uploads.StoredUpload, uploads.StoredUpload, str, Job | None]:
    """What is cheap to refuse, before the uploads are checked: their formats, the Idempotency-Key (a retry gets
    its job back), the tenant's quota. Returns the uploads, the request's hash and the job a retry made, if any."""
    (model_name, model_blob), (data_name, data_blob) = model, data
    model_up = uploads.StoredUpload(
        store.path(model_blob),
        uploads.model_format(model_name, store.path(model_blob), settings.allow_pickle_models),
        model_name,
    )
    data_up = uploads.StoredUpload(
        store.path(data_blob), uploads.data_format(data_name, store.path(data_blob), settings.max_data_bytes), data_name
    )
    spec_json = spec.model_dump(mode="json", by_alias=True)
    request_hash = hashlib.sha256(json.dumps([spec_json, model_blob, data_blob], sort_keys=True).encode()).hexdigest()
    existing = None
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= 200:
            raise Problem(
                400,
                "invalid-idempotency-key",
                "Invalid Idempotency-Key",
                "The Idempotency-Key header must be 1 to 200 characters (a UUID is a good choice).",
                field="Idempotency-Key",
            )
        existing = _by_idempotency_key(session, tenant, idempotency_key, request_hash)
    if existing is None:
        _check_quota(session, settings, tenant)
        session.rollback()  # hold no connection while the uploads are checked (seconds)
    return model_up, data_up, request_hash, existing


def _record_job(
    session: Session,
    settings: Settings,
    queue: Queue,
    bus: Bus,
    tenant: str,
    spec: JobSpec,
    model: tuple[str, uploads.StoredUpload],
    data: tuple[str, uploads.StoredUpload],
    request_hash: str,
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    (model_blob, model_up), (data_blob, data_up) = model, data
    _check_quota(session, settings, tenant)  # again: other jobs may have been made while the uploads were checked
    job = lifecycle.new_job(
        id=f"j_{secrets.token_hex(10)}",
        tenant=tenant,
        name=spec.name,
        spec=spec.model_dump(mode="json", by_alias=True),
        model_blob=model_blob,
        model_format=model_up.format,
        data_blob=data_blob,
        data_format=data_up.format,
        model_name=(model_up.filename or "")[:200] or None,
        data_name=(data_up.filename or "")[:200] or None,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        progress=Progress().model_dump(),
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:  # a concurrent retry under the same key won the race
        session.rollback()
        existing = _by_idempotency_key(session, tenant, idempotency_key, request_hash) if idempotency_key else None
        if existing is None:
            raise
        return existing, False

    # The job exists from here on: what follows must not turn the answer into an error (the client would
    # think nothing was made). A job not sent now is sent by a reconciler.
    lifecycle.submitted(bus, job.id)
    recovery.send(settings, queue, [job.id])
    return job, True


def _check_quota(session: Session, settings: Settings, tenant: str) -> None:
    count = select(func.count()).select_from(Job).where(Job.tenant == tenant, Job.state.in_(ACTIVE))
    active = session.execute(count).scalar_one()
    if active >= settings.max_active_jobs_per_tenant:
        raise Problem(
            429,
            "too-many-jobs",
            "Too many active jobs",
            f"This tenant has {active} queued or running jobs, its limit; submit again when one has "
            "finished (or cancel one).",
            headers={"Retry-After": "30"},
        )


def _by_idempotency_key(session: Session, tenant: str, key: str, request_hash: str) -> Job | None:
    job = session.scalar(select(Job).where(Job.tenant == tenant, Job.idempotency_key == key))
    if job is not None and job.request_hash != request_hash:
        raise Problem(
            422,
            "idempotency-key-reused",
            "Idempotency-Key reused",
            f"The Idempotency-Key {key!r} was used for another request (job {job.id}) with a different spec "
            "or files; use a new key for a new job.",
            field="Idempotency-Key",
        )
    return job


# --- reading jobs ---------------------------------------------------------------------------------------------


def get_job(session: Session, tenant: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant != tenant:
        raise not_found("job", job_id)
    return job


def job_view(job: Job, bus: Bus) -> dict:
    """The job as docs/API.md shows it; a running job's progress comes from the bus, fresher than the database."""
    progress = job.progress
    if job.state in ACTIVE:
        live = _live(bus, job.id)
        if live is not None:
            progress = live["progress"]
    base = f"/v1/jobs/{job.id}"
    return {
        "id": job.id,
        "state": job.state,
        "created_at": utc(job.created_at),
        "started_at": utc(job.started_at),
        "finished_at": utc(job.finished_at),
        "spec": job.spec,
        "progress": progress,
        "error": job.error,
        "summary": job.summary,
        "links": {
            "self": base,
            "neurons": f"{base}/neurons",
            "events": f"{base}/events",
            "ablation": f"{base}/ablation",
            "importance": f"{base}/importance",
            "edits": f"{base}/edits",
            "report": f"{base}/report",
        },
    }


def _live(bus: Bus, job_id: str) -> dict | None:
    """The live snapshot, or None when the bus is unreachable: the database answers instead, a little staler."""
    try:
        return bus.get_live(job_id)
    except Exception as exc:  # Redis down must not turn reads into 500s
        log.warning("live state of %s unavailable: %s", job_id, exc)
        return None


def list_jobs(
    session: Session, settings: Settings, bus: Bus, tenant: str, state: JobState | None, limit: int, cursor: str | None
) -> dict:
    scope = f"jobs:{tenant}:{state or ''}"
    query = select(Job).where(Job.tenant == tenant)
    if state is not None:
        query = query.where(Job.state == state)
    jobs, next_cursor = cursors.newest_first(session, query, Job, scope, settings.cursor_secret, limit, cursor)
    return {"items": [job_view(j, bus) for j in jobs], "next_cursor": next_cursor}


# --- neurons and the ablation check ---------------------------------------------------------------------------


def list_neurons(
    session: Session,
    settings: Settings,
    bus: Bus,
    job: Job,
    order: str,
    limit: int,
    cursor: str | None,
    layer: str | None,
) -> dict:
    """The ranked neurons: live while the job runs, final after (rank 1 = highest value)."""
    scope = f"neurons:{job.id}:{order}:{layer or ''}"
    after = cursors.decode(cursor, scope, settings.cursor_secret)["r"] if cursor else None
    descending_value = order == "desc"  # highest value first = rank ascending
    if job.state in ACTIVE:
        live = _live(bus, job.id)
        rows = live["neurons"] if live is not None else []
        rows = [n for n in rows if layer is None or n["layer"] == layer]
        rows.sort(key=lambda n: n["rank"], reverse=not descending_value)
        if after is not None:
            rows = [n for n in rows if (n["rank"] > after if descending_value else n["rank"] < after)]
        page = rows[: limit + 1]
        if layer is not None and not page and live is not None:
            _check_layer(layer, {n["layer"] for n in live["neurons"]})
    else:
        query = select(JobNeuron).where(JobNeuron.job_id == job.id)
        if layer is not None:
            query = query.where(JobNeuron.layer == layer)
        if after is not None:
            query = query.where(JobNeuron.rank > after if descending_value else JobNeuron.rank < after)
        query = query.order_by(JobNeuron.rank if descending_value else JobNeuron.rank.desc()).limit(limit + 1)
        page = [Neuron.model_validate(n, from_attributes=True).model_dump() for n in session.scalars(query)]
        if layer is not None and not page:
            _check_layer(
                layer, set(session.scalars(select(JobNeuron.layer).where(JobNeuron.job_id == job.id).distinct()))
            )
    next_cursor = None
    if len(page) > limit:
        page = page[:limit]
        next_cursor = cursors.encode({"r": page[-1]["rank"]}, scope, settings.cursor_secret)
    return {"items": page, "next_cursor": next_cursor}


def _check_layer(layer: str, known: set[str]) -> None:
    """A ``layer`` filter that names no layer of the job is a mistake to point out, not an empty page (a job with no
    neurons yet has nothing to check against)."""
    if known and layer not in known:
        names = sorted(known)
        shown = ", ".join(names[:20]) + (f", … ({len(names)} in all)" if len(names) > 20 else "")
        raise Problem(
            400,
            "unknown-layer",
            "Unknown layer",
            f"The job has no layer {layer!r}; its layers are {shown}. Use one of these names, as the neurons list "
            "them, or leave the filter out.",
            field="layer",
        )


def get_ablation(session: Session, job: Job) -> dict:
    ablation = session.get(JobAblation, job.id)
    if ablation is None:
        raise Problem(
            409,
            "not-ready",
            "No ablation check yet",
            f"The ablation check is measured when a job succeeds; job {job.id} is {job.state}."
            + (" Poll GET /v1/jobs/{id} until it is succeeded." if job.state in ACTIVE else ""),
        )
    return ablation.curve


# --- cancelling and deleting ----------------------------------------------------------------------------------


def cancel_job(session: Session, bus: Bus, tenant: str, job_id: str) -> Job:
    """Queued jobs end at once; running ones are asked to stop and end ``cancelled`` within seconds.

    A queued job that has run before (its worker died or shut down) has partial estimates in a checkpoint:
    it goes ``cancelling`` too, and the next worker to take it stores those estimates and ends it at once.
    """
    job = get_job(session, tenant, job_id)
    lifecycle.request_cancel(session, bus, job_id)
    session.refresh(job)
    if job.state in (JobState.SUCCEEDED, JobState.FAILED):
        raise Problem(
            409,
            "job-finished",
            "Job already finished",
            f"Job {job_id} is {job.state}; only a queued or running job can be cancelled.",
        )
    return job


def delete_job(session: Session, store: BlobStore, bus: Bus, tenant: str, job_id: str) -> None:
    job = get_job(session, tenant, job_id)
    if job.state not in FINISHED:
        raise Problem(
            409,
            "job-active",
            "Job still active",
            f"Job {job_id} is {job.state}; cancel it (POST /v1/jobs/{job_id}/cancel) and delete it once it "
            "is cancelled.",
        )
    blobs = {job.model_blob, job.data_blob}
    for edit in session.scalars(select(Edit).where(Edit.job_id == job_id)):  # its edits' held-out data and models
        blobs |= {b for b in (edit.data_blob, edit.model_blob) if b is not None}
    # Explicit: SQLite enforces ON DELETE CASCADE only under a per-connection setting.
    for table in (JobNeuron, JobAblation, JobCheckpoint, Edit):
        session.execute(delete(table).where(table.job_id == job_id))
    session.delete(job)
    session.commit()
    _forget_blobs(session, store, blobs)
    best_effort(job_id, "clearing the deleted job's live state", lambda: bus.clear(job_id))  # else it expires


# --- events ---------------------------------------------------------------------------------------------------


async def job_events(
    session: Session,
    settings: Settings,
    bus: Bus,
    tenant: str,
    job_id: str,
    last_event_id: str | None,
    disconnected: Callable[[], Awaitable[bool]],
) -> AsyncIterator[JobEvent | None]:
    """A job's events until its ``done`` event, resuming after ``Last-Event-ID``; None when there is nothing new
    (the endpoint keeps the connection alive with it).

    Events come from the job's stream on the bus. When the stream has nothing
    to say (a finished job whose stream has expired, or a bus that is down),
    the job's record in the database says how it ended.
    """
    if last_event_id is not None and not valid_event_id(last_event_id):
        raise Problem(
            400,
            "invalid-event-id",
            "Invalid Last-Event-ID",
            f"Last-Event-ID {last_event_id!r} is not an id this stream sent; omit it to start from the beginning.",
            field="Last-Event-ID",
        )
    job = await run_in_threadpool(get_job, session, tenant, job_id)
    session.close()  # a stream may stay open for hours: hold no connection meanwhile
    factory = session_factory(settings.resolved_database_url)

    async def stream() -> AsyncIterator[JobEvent | None]:
        after = last_event_id
        while not await disconnected():
            try:
                events = await asyncio.to_thread(bus.read, job.id, after, EVENT_BLOCK_S)
            except Exception as exc:  # the bus is down: say so, and fall back on the record
                log.warning("events of %s unavailable: %s", job.id, exc)
                events = []
                await asyncio.sleep(1.0)
            for event in events:
                after = event[0]
                yield event
                if event[1] == "done":
                    return
            if events:
                continue
            try:
                current = await run_in_threadpool(_current, factory, job.id)
            except UNAVAILABLE as exc:  # the database is restarting: keep the stream open and ask again
                log.warning("events of %s: job record unavailable: %s", job.id, exc)
                yield None
                await asyncio.sleep(1.0)
                continue
            if current is None or current.state in FINISHED:
                state = current.state if current is not None else "deleted"
                yield None, "state", {"state": state, "error": current.error if current else None}
                yield None, "done", {"state": state}
                return
            yield None

    return stream()


def _current(factory: sessionmaker[Session], job_id: str) -> Job | None:
    with factory() as session:
        return session.get(Job, job_id)
