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

Edits (:mod:`app.edits.recovery`) are recovered in the same passes, the same
way: a lease, requeued when it expires, sent again when their message was lost.

Workers run :func:`reconcile` on a timer; the embedded service runs
:func:`requeue_unfinished` when it starts, since its own thread was the only
worker.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import or_, select

from app.core.bus import Bus
from app.core.clock import now
from app.core.config import Settings
from app.core.db import session_factory
from app.core.queue import Queue, send_each
from app.edits import recovery as edits

from . import lifecycle
from .models import Job


def reconcile(settings: Settings, queue: Queue, bus: Bus) -> list[str]:
    """Requeue jobs with an expired lease or a lost message; end abandoned cancellations. Returns the ids sent."""
    with session_factory(settings.resolved_database_url)() as session:
        lifecycle.recover_expired(session, bus)
        stale = now() - timedelta(seconds=settings.requeue_after_s)
        ids = list(
            session.scalars(
                select(Job.id)
                .where(lifecycle.waiting_for_worker(), or_(Job.enqueued_at.is_(None), Job.enqueued_at < stale))
                .order_by(Job.created_at)
            )
        )
    waiting = queue.waiting()
    if waiting is not None:  # a job whose message is still in the queue is waiting its turn, not lost
        ids = [job_id for job_id in ids if job_id not in waiting]
    return send(settings, queue, ids) + edits.reconcile(settings, queue, waiting)


def requeue_unfinished(settings: Settings, queue: Queue, bus: Bus) -> list[str]:
    """At the embedded service's start: whatever was running belonged to the previous process."""
    with session_factory(settings.resolved_database_url)() as session:
        lifecycle.recover_all(session, bus)
        ids = list(session.scalars(select(Job.id).where(lifecycle.waiting_for_worker()).order_by(Job.created_at)))
    return send(settings, queue, ids) + edits.requeue_unfinished(settings, queue)


def send(settings: Settings, queue: Queue, ids: list[str]) -> list[str]:
    """Queue each job and record when; a job that cannot be sent now is tried again later."""
    return send_each(settings, queue.enqueue, lifecycle.mark_sent, ids)
