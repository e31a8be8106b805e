"""Every change of an edit's state, one function per transition, each a guarded conditional ``UPDATE``.

This module is the only writer of ``Edit.state`` and of an edit's lease, as
:mod:`app.jobs.lifecycle` is for jobs; an edit never changes its job.

=========================  =====================================  ==================================
transition                 from                                   to
=========================  =====================================  ==================================
:func:`new_edit`           (submitted)                            queued
:func:`claim`              queued; running with an expired lease  running (attempts + 1)
:func:`renew`              running (lease holder)                 running, lease extended
:func:`finish`             running (lease holder)                 succeeded, with the result
:func:`fail`               running (lease holder)                 failed, with the error
:func:`recover_expired`    running, lease expired                 queued, or failed after
                                                                  ``MAX_ATTEMPTS`` claims
:func:`recover_all`        running, any lease (embedded start)    as above
=========================  =====================================  ==================================

An edit has no checkpoint: it takes seconds, and one whose worker died is
simply run again from the start. One that has killed ``MAX_ATTEMPTS``
workers (a model too big for their memory) fails instead of taking the
next one down too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, update
from sqlalchemy.orm import Session

from app.core.clock import now
from app.core.db import rowcount
from app.jobs.states import JobState

from .models import Edit

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
ABANDONED = {
    "type": "internal",
    "title": "The edit's worker stopped",
    "detail": f"Every worker that took this edit ({MAX_ATTEMPTS} of them) stopped before it ended (out of memory?); "
    "the operator has their logs. The job is untouched; submit the edit again, or a smaller selection.",
}


@dataclass(frozen=True)
class Lease:
    """A worker's hold on one edit."""

    edit_id: str
    owner: str
    seconds: float

    def expiry(self) -> datetime:
        return now() + timedelta(seconds=self.seconds)

    def mine(self) -> ColumnElement[bool]:
        return and_(Edit.id == self.edit_id, Edit.lease_owner == self.owner, Edit.state == JobState.RUNNING)


def new_edit(**fields: Any) -> Edit:
    """An edit as submitted: ``queued``, to be sent to a worker. The caller adds and commits it."""
    t = now()
    return Edit(state=JobState.QUEUED, created_at=t, enqueued_at=t, attempts=0, **fields)


def mark_sent(session: Session, edit_ids: Iterable[str]) -> None:
    """Record that these queued edits were just handed to the queue: the reconciler waits before sending again."""
    session.execute(
        update(Edit).where(Edit.id.in_(list(edit_ids)), Edit.state == JobState.QUEUED).values(enqueued_at=now())
    )
    session.commit()


def claim(session: Session, lease: Lease) -> Edit | None:
    """queued → running, or take over a running edit whose lease expired. None: not ours to run."""
    t = now()
    claimable = or_(
        Edit.state == JobState.QUEUED,
        and_(Edit.state == JobState.RUNNING, or_(Edit.lease_expires_at.is_(None), Edit.lease_expires_at < t)),
    )
    claimed = rowcount(
        session,
        update(Edit)
        .where(Edit.id == lease.edit_id, claimable, Edit.attempts < MAX_ATTEMPTS)
        .values(
            state=JobState.RUNNING,
            started_at=func.coalesce(Edit.started_at, t),
            attempts=Edit.attempts + 1,
            lease_owner=lease.owner,
            lease_expires_at=lease.expiry(),
        ),
    )
    session.commit()
    return session.get(Edit, lease.edit_id) if claimed else None


def renew(session: Session, lease: Lease) -> bool:
    """Extend the lease; False when it was lost (expired and claimed by another worker, or the edit deleted)."""
    renewed = rowcount(session, update(Edit).where(lease.mine()).values(lease_expires_at=lease.expiry()))
    session.commit()
    return bool(renewed)


def finish(session: Session, lease: Lease, result: dict, model_blob: str) -> JobState | None:
    """running → succeeded, with the figures and the edited model's blob, in one transaction. None: the lease was
    lost and nothing was written."""
    if not rowcount(
        session,
        update(Edit)
        .where(lease.mine())
        .values(
            state=JobState.SUCCEEDED,
            finished_at=now(),
            result=result,
            model_blob=model_blob,
            lease_owner=None,
            lease_expires_at=None,
        ),
    ):
        session.rollback()
        return None
    session.commit()
    log.info("edit %s: succeeded", lease.edit_id)
    return JobState.SUCCEEDED


def fail(session: Session, lease: Lease, error: dict) -> JobState | None:
    """running → failed, with the error users read; None when the lease was lost."""
    if not rowcount(
        session,
        update(Edit)
        .where(lease.mine())
        .values(state=JobState.FAILED, finished_at=now(), error=error, lease_owner=None, lease_expires_at=None),
    ):
        session.rollback()
        return None
    session.commit()
    log.info("edit %s: failed: %s", lease.edit_id, error.get("detail"))
    return JobState.FAILED


def recover_expired(session: Session) -> None:
    """Edits whose lease expired (their worker died): back to ``queued`` for the next worker, or ``failed`` once
    ``MAX_ATTEMPTS`` workers have taken them."""
    _recover(session, Edit.lease_expires_at < now())


def recover_all(session: Session) -> None:
    """At the embedded service's start: every lease belonged to the previous process, its only worker."""
    _recover(session)


def _recover(session: Session, *where: ColumnElement[bool]) -> None:
    running = Edit.state == JobState.RUNNING
    failed = (
        session.execute(
            update(Edit)
            .where(running, Edit.attempts >= MAX_ATTEMPTS, *where)
            .values(state=JobState.FAILED, finished_at=now(), error=ABANDONED, lease_owner=None, lease_expires_at=None)
            .returning(Edit.id)
        )
        .scalars()
        .all()
    )
    requeued = (
        session.execute(
            update(Edit)
            .where(running, *where)
            .values(state=JobState.QUEUED, lease_owner=None, lease_expires_at=None, enqueued_at=None)
            .returning(Edit.id)
        )
        .scalars()
        .all()
    )
    session.commit()
    for edit_id in failed:
        log.warning("edit %s: failed after %d workers stopped running it", edit_id, MAX_ATTEMPTS)
    for edit_id in requeued:
        log.warning("edit %s: its worker stopped renewing the lease; requeued", edit_id)
