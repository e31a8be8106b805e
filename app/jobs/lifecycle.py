"""Every change of a job's state, one function per transition, each with its guard.

This module is the only writer of ``Job.state`` and of a job's lease. Each
transition is one conditional ``UPDATE`` (so a worker and an API request
racing for the same job cannot both win), committed on its own, and announced
on the bus once committed (best effort: the database is the record).

=========================  =====================================  ==================================
transition                 from                                   to
=========================  =====================================  ==================================
:func:`new_job`            (submitted)                            queued
:func:`request_cancel`     queued, never run                      cancelled
:func:`request_cancel`     queued with a checkpoint, or running   cancelling
:func:`claim`              queued; running/cancelling, lease      running (a cancelling job stays
                           expired                                cancelling)
:func:`renew`              running, cancelling (lease holder)     the same, lease extended
:func:`checkpoint`         running, cancelling (lease holder)     the same, estimates saved
:func:`finish`             running, cancelling (lease holder)     succeeded, or cancelled
:func:`fail`               running, cancelling (lease holder)     failed
:func:`hand_back`          running, cancelling (lease holder)     queued (cancelling stays so)
:func:`recover_expired`    running, lease expired                 queued
:func:`recover_expired`    cancelling, lease expired              cancelled (no checkpoint), or
                                                                  unleased, for a worker to finish
:func:`recover_all`        as above, any lease (embedded start)   as above
=========================  =====================================  ==================================

A worker's writes (:func:`renew`, :func:`checkpoint`, :func:`finish`,
:func:`fail`, :func:`hand_back`) are guarded by its :class:`Lease`: once a
lease has expired and another worker claimed the job, the first worker's
writes change nothing and return ``False``/``None``, and it stops.
Cancellation is never undone: a cancelling job stays cancelling through
claims and hand-backs, until a worker stores its partial estimates.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, delete, func, or_, update
from sqlalchemy.orm import Session

from app.core.bus import Bus, announce, announce_end
from app.core.clock import now
from app.core.db import rowcount

from .models import Job, JobAblation, JobCheckpoint, JobNeuron, has_checkpoint
from .states import JobState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    """A worker's hold on one job: who holds it, and for how long each renewal keeps it."""

    job_id: str
    owner: str
    seconds: float

    def expiry(self) -> datetime:
        return now() + timedelta(seconds=self.seconds)

    def mine(self) -> ColumnElement[bool]:
        """The condition that guards every write: the job is still leased to this worker."""
        return and_(Job.id == self.job_id, Job.lease_owner == self.owner)


def _unless_cancelling(state: JobState) -> Any:
    """The new state of a job that moves to ``state``, unless it is being cancelled: cancellation is never undone."""
    return case((Job.state == JobState.CANCELLING, Job.state), else_=state.value)


def _unleased(t: datetime) -> ColumnElement[bool]:
    return or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < t)


# --- the API's transitions -------------------------------------------------------------------------------------


def new_job(**fields: Any) -> Job:
    """A job as submitted: ``queued``, to be sent to a worker. The caller adds and commits it (see
    :func:`submitted`), since it also settles an Idempotency-Key race in that transaction."""
    t = now()
    return Job(state=JobState.QUEUED, created_at=t, enqueued_at=t, cancel_requested=False, **fields)


def submitted(bus: Bus, job_id: str) -> None:
    announce(bus, job_id, "state", {"state": JobState.QUEUED})


def mark_sent(session: Session, job_ids: Iterable[str]) -> None:
    """Record that these queued jobs were just handed to the queue: the reconciler waits before sending again."""
    session.execute(
        update(Job).where(Job.id.in_(list(job_ids)), Job.state == JobState.QUEUED).values(enqueued_at=now())
    )
    session.commit()


def request_cancel(session: Session, bus: Bus, job_id: str) -> None:
    """queued (never run) → cancelled at once; queued (with partial estimates) or running → cancelling.

    A queued job that has run before (its worker died or shut down) has partial estimates in a checkpoint: it goes
    ``cancelling`` too, and the next worker to take it stores those estimates and ends it. Anything else is left
    as it is (cancelling again is a no-op; a finished job is the caller's 409).
    """
    if rowcount(
        session,
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.QUEUED, ~has_checkpoint())
        .values(state=JobState.CANCELLED, cancel_requested=True, finished_at=now()),
    ):
        session.commit()
        announce_end(bus, job_id, {"state": JobState.CANCELLED})
    elif rowcount(
        session,
        update(Job)
        .where(Job.id == job_id, Job.state.in_((JobState.QUEUED, JobState.RUNNING)))
        .values(state=JobState.CANCELLING, cancel_requested=True),
    ):
        session.commit()
        announce(bus, job_id, "state", {"state": JobState.CANCELLING})
    else:
        session.rollback()


# --- a worker's transitions ------------------------------------------------------------------------------------


def claim(session: Session, bus: Bus, lease: Lease) -> Job | None:
    """queued → running, or take over a running/cancelling job whose lease expired. None: not ours to run.

    A cancelling job stays cancelling: its worker stores the partial estimates and ends it.
    """
    t = now()
    claimable = or_(
        Job.state == JobState.QUEUED, and_(Job.state.in_((JobState.RUNNING, JobState.CANCELLING)), _unleased(t))
    )
    claimed = rowcount(
        session,
        update(Job)
        .where(Job.id == lease.job_id, claimable)
        .values(
            state=_unless_cancelling(JobState.RUNNING),
            started_at=func.coalesce(Job.started_at, t),
            lease_owner=lease.owner,
            lease_expires_at=lease.expiry(),
        ),
    )
    session.commit()
    job = session.get(Job, lease.job_id) if claimed else None
    if job is not None:
        announce(bus, job.id, "state", {"state": job.state})
    return job


def renew(session: Session, lease: Lease) -> bool:
    """Extend the lease; False when it was lost (expired and claimed by another worker, or the job was deleted)."""
    renewed = rowcount(
        session,
        update(Job)
        .where(lease.mine(), Job.state.in_((JobState.RUNNING, JobState.CANCELLING)))
        .values(lease_expires_at=lease.expiry()),
    )
    session.commit()
    return bool(renewed)


def checkpoint(session: Session, lease: Lease, state: bytes, iterations: int, progress: dict) -> bool:
    """Save the estimator's state and progress, if the job is still ours."""
    if not rowcount(session, update(Job).where(lease.mine()).values(progress=progress)):
        session.rollback()
        return False
    session.merge(JobCheckpoint(job_id=lease.job_id, state=state, iterations=iterations, saved_at=now()))
    session.commit()
    return True


def finish(
    session: Session,
    bus: Bus,
    lease: Lease,
    outcome: JobState,
    neurons: list[dict],
    summary: dict,
    progress: dict,
    curve: dict | None,
) -> JobState | None:
    """running or cancelling → ``outcome`` (succeeded, or cancelled for a run stopped by a cancel request), with the
    result, in one transaction: a result is whole or absent. None: the lease was lost and nothing was written.

    A run that converged just as a cancel request came in still ends ``succeeded``: its result is complete.
    """
    if outcome not in (JobState.SUCCEEDED, JobState.CANCELLED):
        raise ValueError(f"a job finishes succeeded or cancelled, not {outcome}")
    if not rowcount(
        session,
        update(Job)
        .where(lease.mine(), Job.state.in_((JobState.RUNNING, JobState.CANCELLING)))
        .values(
            state=outcome,
            finished_at=now(),
            summary=summary,
            progress=progress,
            lease_owner=None,
            lease_expires_at=None,
        ),
    ):
        session.rollback()
        log.warning("job %s: lease lost before the result was written; another worker owns it", lease.job_id)
        return None
    job_id = lease.job_id
    session.execute(delete(JobNeuron).where(JobNeuron.job_id == job_id))
    session.add_all(JobNeuron(job_id=job_id, **n) for n in neurons)
    if curve is not None:
        session.merge(JobAblation(job_id=job_id, curve=curve))
    session.execute(delete(JobCheckpoint).where(JobCheckpoint.job_id == job_id))
    session.commit()
    announce_end(bus, job_id, {"state": outcome})
    log.info("job %s: %s", job_id, outcome)
    return outcome


def fail(session: Session, bus: Bus, lease: Lease, error: dict) -> JobState | None:
    """running or cancelling → failed, with the error users read; None when the lease was lost."""
    if not rowcount(
        session,
        update(Job)
        .where(lease.mine(), Job.state.in_((JobState.RUNNING, JobState.CANCELLING)))
        .values(state=JobState.FAILED, finished_at=now(), error=error, lease_owner=None, lease_expires_at=None),
    ):
        session.rollback()
        return None
    session.execute(delete(JobCheckpoint).where(JobCheckpoint.job_id == lease.job_id))
    session.commit()
    announce_end(bus, lease.job_id, {"state": JobState.FAILED, "error": error})
    log.info("job %s: failed: %s", lease.job_id, error.get("detail"))
    return JobState.FAILED


def hand_back(session: Session, bus: Bus, lease: Lease) -> JobState | None:
    """running → queued (a cancelling job stays cancelling), lease released: the worker is shutting down and the
    next worker resumes from the checkpoint. None when the lease was lost."""
    handed_back = session.execute(
        update(Job)
        .where(lease.mine(), Job.state.in_((JobState.RUNNING, JobState.CANCELLING)))
        .values(state=_unless_cancelling(JobState.QUEUED), lease_owner=None, lease_expires_at=None, enqueued_at=now())
        .returning(Job.state)
    ).scalar_one_or_none()
    session.commit()
    if handed_back is None:
        return None
    state = JobState(handed_back)
    announce(bus, lease.job_id, "state", {"state": state})
    log.info("job %s: handed back at a checkpoint (worker shutting down)", lease.job_id)
    return state


# --- recovery: jobs whose worker is gone -----------------------------------------------------------------------


def recover_expired(session: Session, bus: Bus) -> None:
    """Jobs whose lease expired (their worker died): running → queued, for the next worker to resume; a cancelling
    one ends ``cancelled`` when there is nothing to keep, else waits for a worker to store its estimates."""
    expired = Job.lease_expires_at < now()
    _release_cancellations(session, bus, expired)
    requeued = (
        session.execute(
            update(Job)
            .where(Job.state == JobState.RUNNING, expired)
            .values(state=JobState.QUEUED, lease_owner=None, lease_expires_at=None, enqueued_at=None)
            .returning(Job.id)
        )
        .scalars()
        .all()
    )
    session.commit()
    for job_id in requeued:
        log.warning("job %s: its worker stopped renewing the lease; requeued", job_id)
        announce(bus, job_id, "state", {"state": JobState.QUEUED})


def recover_all(session: Session, bus: Bus) -> None:
    """At the embedded service's start: every lease belonged to the previous process, its only worker."""
    requeued = (
        session.execute(
            update(Job)
            .where(Job.state == JobState.RUNNING)
            .values(state=JobState.QUEUED, lease_owner=None, lease_expires_at=None)
            .returning(Job.id)
        )
        .scalars()
        .all()
    )
    _release_cancellations(session, bus)
    session.commit()
    for job_id in requeued:
        announce(bus, job_id, "state", {"state": JobState.QUEUED})


def _release_cancellations(session: Session, bus: Bus, *where: ColumnElement[bool]) -> None:
    """Cancelling jobs whose worker is gone: one without a checkpoint ends ``cancelled`` here; one with a checkpoint
    loses its lease, to be sent to a worker that stores its partial estimates and ends it. Commits."""
    ended = (
        session.execute(
            update(Job)
            .where(Job.state == JobState.CANCELLING, ~has_checkpoint(), *where)
            .values(state=JobState.CANCELLED, finished_at=now(), lease_owner=None, lease_expires_at=None)
            .returning(Job.id)
        )
        .scalars()
        .all()
    )
    session.execute(
        update(Job)
        .where(Job.state == JobState.CANCELLING, Job.lease_owner.is_not(None), *where)
        .values(lease_owner=None, lease_expires_at=None, enqueued_at=None)
    )
    session.commit()
    for job_id in ended:
        log.warning("job %s: cancelled (its worker stopped renewing the lease while cancelling)", job_id)
        announce_end(bus, job_id, {"state": JobState.CANCELLED})


def waiting_for_worker() -> ColumnElement[bool]:
    """Jobs that wait for a worker: queued ones, and cancelling ones whose partial estimates are still to store."""
    return or_(Job.state == JobState.QUEUED, and_(Job.state == JobState.CANCELLING, Job.lease_owner.is_(None)))
