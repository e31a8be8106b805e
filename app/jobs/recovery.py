"""Finding jobs whose worker is gone, and sending them again.

Every running job holds a lease in the database that its worker renews
(``NEURONSHAP_LEASE_S``). A worker killed outright stops renewing: once the
lease has expired the job goes back to ``queued`` and is sent again; the next
worker resumes it from its last checkpoint. A queued job whose message was
lost (the API died between saving it and sending it, or a worker died after
taking the message but before claiming the job) is sent again once it has
waited ``NEURONSHAP_REQUEUE_AFTER_S`` since it was last sent and its message
is not in the queue (the queue is read where it can tell: Redis, and the
embedded thread), so a job waiting its turn in a deep queue is never sent
again. Sending a job twice is harmless: the runner's claim lets one copy run.

A cancelling job whose worker is gone ends ``cancelled`` at once if it has no
checkpoint; with one, it is sent to a worker, which stores the checkpoint's
partial estimates as the job's result without running further.

Workers run :func:`reconcile` on a timer; the embedded service runs
:func:`requeue_unfinished` when it starts, since its own thread was the only
worker.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import UNAVAILABLE, session_factory
from app.core.queue import Queue

from .models import Job, has_checkpoint

log = logging.getLogger(__name__)


def now() -> datetime:
    return datetime.now(UTC)


def reconcile(settings: Settings, queue: Queue) -> list[str]:
    """Requeue jobs with an expired lease or a lost message; end abandoned cancellations. Returns the ids sent."""
    t = now()
    expired = Job.lease_expires_at < t
    with session_factory(settings.resolved_database_url)() as session:
        abandoned = _release_cancellations(session, expired)
        orphaned = session.execute(update(Job).where(Job.state == "running", expired)
                                   .values(state="queued", lease_owner=None, lease_expires_at=None, enqueued_at=None)
                                   .returning(Job.id)).scalars().all()
        session.commit()
        stale = t - timedelta(seconds=settings.requeue_after_s)
        ids = list(session.scalars(select(Job.id).where(
            _unleased_to_run(), or_(Job.enqueued_at.is_(None), Job.enqueued_at < stale)).order_by(Job.created_at)))
    waiting = queue.waiting()
    if waiting is not None:  # a job whose message is still in the queue is waiting its turn, not lost
        ids = [job_id for job_id in ids if job_id not in waiting]
    for job_id in abandoned:
        log.warning("job %s: cancelled (its worker stopped renewing the lease while cancelling)", job_id)
    for job_id in orphaned:
        log.warning("job %s: its worker stopped renewing the lease; requeued", job_id)
    return send(settings, queue, ids)


def requeue_unfinished(settings: Settings, queue: Queue) -> list[str]:
    """At the embedded service's start: whatever was running belonged to the previous process."""
    with session_factory(settings.resolved_database_url)() as session:
        session.execute(update(Job).where(Job.state == "running")
                        .values(state="queued", lease_owner=None, lease_expires_at=None))
        _release_cancellations(session)
        session.commit()
        ids = list(session.scalars(select(Job.id).where(_unleased_to_run()).order_by(Job.created_at)))
    return send(settings, queue, ids)


def _release_cancellations(session: Session, *where: ColumnElement[bool]) -> list[str]:
    """Cancelling jobs whose worker is gone: one without a checkpoint ends ``cancelled`` here (returns their ids);
    one with a checkpoint loses its lease, to be sent to a worker that stores its partial estimates and ends it."""
    ended = session.execute(update(Job).where(Job.state == "cancelling", ~has_checkpoint(), *where)
                            .values(state="cancelled", finished_at=now(), lease_owner=None, lease_expires_at=None)
                            .returning(Job.id)).scalars().all()
    session.execute(update(Job).where(Job.state == "cancelling", Job.lease_owner.is_not(None), *where)
                    .values(lease_owner=None, lease_expires_at=None, enqueued_at=None))
    return list(ended)


def _unleased_to_run() -> ColumnElement[bool]:
    """Jobs that wait for a worker: queued ones, and cancelling ones whose partial estimates are still to store."""
    return or_(Job.state == "queued", and_(Job.state == "cancelling", Job.lease_owner.is_(None)))


def send(settings: Settings, queue: Queue, ids: list[str]) -> list[str]:
    """Queue each job and record when; a job that cannot be sent now is tried again later."""
    sent = []
    for job_id in ids:
        try:
            queue.enqueue(job_id)
        except Exception as exc:
            log.warning("job %s: not queued (%s); will retry", job_id, exc)
            continue
        sent.append(job_id)
    if sent:
        try:
            with session_factory(settings.resolved_database_url)() as session:
                session.execute(update(Job).where(Job.id.in_(sent), Job.state == "queued").values(enqueued_at=now()))
                session.commit()
        except UNAVAILABLE as exc:  # unrecorded, the jobs look unsent: a reconciler sends them again, harmlessly
            log.warning("jobs %s: sent, but the time of sending was not recorded: %s", sent, exc)
    return sent
