"""The states of a job, shared by the tables, the HTTP shapes and the worker.

Only :mod:`app.jobs.lifecycle` moves a job from one state to another.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"  # waits for a worker (again, after a worker died or shut down)
    RUNNING = "running"  # a worker holds its lease
    CANCELLING = "cancelling"  # asked to stop; a worker stores its partial estimates and ends it
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


ACTIVE = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING})
FINISHED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
