"""Runs one edit: load the job's model and data, remove the selected neurons, measure, write the edited model.

An edit never re-runs the estimator and never changes its job: it reads the
job's ranked neurons, builds the job's game (:func:`worker.translate.build_game`
with the job's spec, through the job runner's own ``_build``), and calls
:func:`worker.shapley.editing.run_edit` (every figure a forward pass of the
game's masked model) and :func:`worker.shapley.onnx_export.edited_onnx` (the
file that reproduces them). The ONNX file goes to the blob store; the result
and the file's blob are written in one transaction through
:mod:`app.edits.lifecycle`, so an edit is whole or absent.

The edit is claimed with a lease that a thread renews while it runs, as a
job's is: an edit whose worker dies is requeued by the reconciler once the
lease expires (:mod:`app.edits.recovery`), and a second delivery of the same
edit finds it claimed and does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.core.blobs import BlobStore
from app.core.bus import Bus
from app.core.config import Settings
from app.core.db import UNAVAILABLE, session_factory
from app.edits import lifecycle
from app.edits.lifecycle import Lease
from app.edits.models import Edit
from app.jobs.models import Job, JobNeuron
from app.jobs.schemas import Neuron
from app.jobs.service import _forget_blob
from app.jobs.states import JobState
from worker.process import prepare_process
from worker.runner import ERROR_TYPES, _build, _in, _Patience, job_files, worker_identity
from worker.shapley import EditError, UserInputError, load_data, run_edit
from worker.shapley.onnx_export import edited_onnx
from worker.upload_names import link

log = logging.getLogger(__name__)


def run_edit_job(
    edit_id: str, settings: Settings, bus: Bus, should_exit: Callable[[], bool] | None = None
) -> JobState | None:
    """Run an edit to its end; returns its new state, or None when it was not (or stopped being) ours to run.

    ``bus`` and ``should_exit`` are the job runner's arguments (the queue calls both alike); an edit takes
    seconds, so a worker shutting down lets it finish rather than stop it halfway.
    """
    db = session_factory(settings.resolved_database_url)
    lease = Lease(edit_id, worker_identity(), settings.lease_s)
    patient = _Patience(edit_id, settings.db_outage_s)
    edit = patient(lambda: _in(db, lambda session: lifecycle.claim(session, lease)))
    if edit is None:
        log.info("edit %s: not claimable (finished, deleted or leased by another worker); skipped", edit_id)
        return None
    prepare_process(settings.threads)
    store = BlobStore(settings.resolved_blob_dir)
    with _renewed(db, lease) as lost:
        try:
            job, neurons = patient(lambda: _in(db, lambda session: _job_and_neurons(session, edit.job_id)))
            result, model = _measure(edit, job, neurons, settings)
        except UNAVAILABLE:
            raise  # an outage longer than our patience: the lease expires and a reconciler sends the edit again
        except EditError as exc:
            kind = "data-error" if exc.field == "data" else "invalid-selection"
            error = {"type": kind, "title": "The edit's input was rejected", "detail": str(exc), "field": exc.field}
            return patient(lambda: _in(db, lambda session: lifecycle.fail(session, lease, error)))
        except UserInputError as exc:
            error = {
                "type": ERROR_TYPES.get(type(exc), "invalid-input"),
                "title": "The edit's input was rejected",
                "detail": str(exc),
            }
            return patient(lambda: _in(db, lambda session: lifecycle.fail(session, lease, error)))
        except Exception as exc:
            log.exception("edit %s: error in the worker", edit_id)
            error = {
                "type": "internal",
                "title": "The worker failed",
                "detail": f"The worker failed on this edit ({type(exc).__name__}); the operator has the details "
                "in its log. The job is untouched.",
            }
            return patient(lambda: _in(db, lambda session: lifecycle.fail(session, lease, error)))
        if lost.is_set():
            log.warning("edit %s: lease lost to another worker; this copy stops without writing", edit_id)
            return None
        digest = _store(store, model)
        try:
            state = patient(lambda: _in(db, lambda session: lifecycle.finish(session, lease, result, digest)))
        finally:
            store.unpin(digest)
        if state is None:  # another worker owns the edit (or it was deleted): the file may be no one's
            _in(db, lambda session: _forget_blob(session, store, digest))
        return state


def _job_and_neurons(session: Session, job_id: str) -> tuple[Job, list[dict]]:
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"job {job_id} was deleted while its edit waited")  # its edit went with it
    rows = session.scalars(select(JobNeuron).where(JobNeuron.job_id == job_id).order_by(JobNeuron.rank))
    return job, [Neuron.model_validate(n, from_attributes=True).model_dump() for n in rows]


def _measure(edit: Edit, job: Job, neurons: list[dict], settings: Settings) -> tuple[dict, bytes]:
    """The edit's figures (the library's result) and the edited ONNX file."""
    with tempfile.TemporaryDirectory(prefix="neuronshap-edit-") as name:
        tmp = Path(name)
        held_out_dir = tmp / "held-out"  # apart: the held-out file may have the same name as the job's data
        model_path, data_path = job_files(job, settings, tmp / "job")
        game, _ = _build(job, settings, (model_path, data_path), None)
        data = load_data(data_path)
        held_out = None
        if edit.data_blob is not None and edit.data_format is not None:  # set together, with the upload
            store = BlobStore(settings.resolved_blob_dir)
            path = link(held_out_dir, store.path(edit.data_blob), edit.data_name, edit.data_format, "held-out")
            try:
                held_out = load_data(path)
            except UserInputError as exc:  # name the client's file, not a server path
                raise EditError(str(exc).replace(f"{held_out_dir}{os.sep}", ""), "data") from exc
        result = run_edit(game, neurons, edit.selection, data, held_out)
        model = edited_onnx(model_path, game, result["removed"])
    return result, model


def _store(store: BlobStore, content: bytes) -> str:
    """Put ``content`` in the blob store, pinned (the caller unpins it once a row refers to it)."""

    async def chunks() -> AsyncIterator[bytes]:
        yield content

    digest, _ = asyncio.run(store.put_stream(chunks(), len(content)))
    return digest


@contextlib.contextmanager
def _renewed(db: sessionmaker[Session], lease: Lease) -> Iterator[threading.Event]:
    """Renew ``lease`` from a thread while the block runs; the event it yields is set once the lease is lost."""
    lost, done = threading.Event(), threading.Event()

    def renew() -> None:
        while not done.wait(lease.seconds / 3):
            try:
                if not _in(db, lambda session: lifecycle.renew(session, lease)):
                    lost.set()
                    return
            except Exception as exc:  # the database is away: try again; the lease covers a few misses
                log.warning("edit %s: lease not renewed: %s", lease.edit_id, exc)

    thread = threading.Thread(target=renew, name=f"lease-{lease.edit_id}", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        done.set()
        thread.join()
