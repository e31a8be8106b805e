"""The edits table. The schema itself is created by ``migrations/`` (0003)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base
from app.jobs.models import STATE_COLUMN
from app.jobs.states import JobState


class Edit(Base):
    """One edit of a job's result: what to remove (``selection``), the held-out data it came with, and, once a
    worker ran it, what was removed, the figures and the edited model (a blob). Its state is a
    :class:`JobState` restricted to queued, running, succeeded and failed; only :mod:`app.edits.lifecycle`
    writes it, and the lease, as for jobs."""

    __tablename__ = "edits"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant: Mapped[str] = mapped_column(String(64))
    state: Mapped[JobState] = mapped_column(STATE_COLUMN)
    selection: Mapped[dict] = mapped_column(JSON)
    data_blob: Mapped[str | None] = mapped_column(String(80))  # the held-out data, if any
    data_format: Mapped[str | None] = mapped_column(String(16))
    data_name: Mapped[str | None] = mapped_column(String(200))  # the name its client gave it, for messages
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    result: Mapped[dict | None] = mapped_column(JSON)  # removed, metrics, curve: the library's figures
    model_blob: Mapped[str | None] = mapped_column(String(80))  # the edited ONNX file
    error: Mapped[dict | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims so far: an edit that kills workers ends
    lease_owner: Mapped[str | None] = mapped_column(String(120))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # last sent; None: to send

    __table_args__ = (
        Index("ix_edits_job_created", "job_id", "created_at", "id"),
        Index("ix_edits_state_lease", "state", "lease_expires_at"),
    )
