"""Putting unfinished jobs back on the queue when their worker is gone.

In the embedded default the only worker is a thread of the API process, so
at start-up a ``running`` job is one the previous process left: it goes back
to ``queued`` (it resumes from its checkpoint) and every queued job is sent
again. A job queued twice is harmless: the runner's claim lets one copy run.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select, update

from app.core.config import Settings
from app.core.db import session_factory
from app.core.queue import Queue

from .models import Job


def requeue_unfinished(settings: Settings, queue: Queue) -> list[str]:
    with session_factory(settings.resolved_database_url)() as session:
        session.execute(update(Job).where(Job.state == "running").values(state="queued"))
        session.execute(update(Job).where(Job.state == "cancelling")
                        .values(state="cancelled", finished_at=datetime.now(UTC)))
        session.commit()
        ids = list(session.scalars(select(Job.id).where(Job.state == "queued").order_by(Job.created_at)))
    for job_id in ids:
        queue.enqueue(job_id)
    return ids
