"""Finding edits whose worker is gone, and sending them again: the same rules as jobs (:mod:`app.jobs.recovery`,
which calls these in its passes).

A running edit whose lease expired goes back to ``queued`` (or fails, after
:data:`app.edits.lifecycle.MAX_ATTEMPTS` workers); a queued edit sent
``requeue_after_s`` ago whose message is not in the queue is sent again.
Sending an edit twice is harmless: the worker's claim lets one copy run.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import or_, select

from app.core.clock import now
from app.core.config import Settings
from app.core.db import session_factory
from app.core.queue import Queue, send_each
from app.jobs.states import JobState

from . import lifecycle
from .models import Edit


def reconcile(settings: Settings, queue: Queue, waiting: set[str] | None) -> list[str]:
    """Requeue edits with an expired lease or a lost message (``waiting``: what the queue holds, if it can tell).
    Returns the ids sent."""
    with session_factory(settings.resolved_database_url)() as session:
        lifecycle.recover_expired(session)
        stale = now() - timedelta(seconds=settings.requeue_after_s)
        ids = list(
            session.scalars(
                select(Edit.id)
                .where(Edit.state == JobState.QUEUED, or_(Edit.enqueued_at.is_(None), Edit.enqueued_at < stale))
                .order_by(Edit.created_at)
            )
        )
    if waiting is not None:
        ids = [edit_id for edit_id in ids if edit_id not in waiting]
    return send(settings, queue, ids)


def requeue_unfinished(settings: Settings, queue: Queue) -> list[str]:
    """At the embedded service's start: whatever was running belonged to the previous process."""
    with session_factory(settings.resolved_database_url)() as session:
        lifecycle.recover_all(session)
        ids = list(session.scalars(select(Edit.id).where(Edit.state == JobState.QUEUED).order_by(Edit.created_at)))
    return send(settings, queue, ids)


def send(settings: Settings, queue: Queue, ids: list[str]) -> list[str]:
    return send_each(settings, queue.enqueue_edit, lifecycle.mark_sent, ids)
