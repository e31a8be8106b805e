"""Tables of the jobs domain. The schema itself is created by ``migrations/``."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    Boolean,
    ColumnElement,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    exists,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base

from .states import JobState

# Stored as the state's text in a VARCHAR(16) (the column migration 0001 made), read back as a JobState.
STATE_COLUMN = Enum(
    JobState,
    native_enum=False,
    create_constraint=False,
    length=16,
    values_callable=lambda states: [s.value for s in states],
    validate_strings=True,
)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    state: Mapped[JobState] = mapped_column(STATE_COLUMN)
    name: Mapped[str | None] = mapped_column(String(200))
    spec: Mapped[dict] = mapped_column(JSON)
    model_blob: Mapped[str] = mapped_column(String(80))
    model_format: Mapped[str] = mapped_column(String(16))
    data_blob: Mapped[str] = mapped_column(String(80))
    data_format: Mapped[str] = mapped_column(String(16))
    # The names its client gave the uploads, for messages (a worker links the blobs under them: worker/upload_names.py).
    model_name: Mapped[str | None] = mapped_column(String(200))
    data_name: Mapped[str | None] = mapped_column(String(200))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    progress: Mapped[dict] = mapped_column(JSON)
    error: Mapped[dict | None] = mapped_column(JSON)
    summary: Mapped[dict | None] = mapped_column(JSON)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(120))  # the worker running it
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # last sent; None: to send

    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_tenant_created", "tenant", "created_at", "id"),
        Index("ix_jobs_tenant_state_created", "tenant", "state", "created_at", "id"),
        Index("ix_jobs_state_lease", "state", "lease_expires_at"),
    )


class JobNeuron(Base):
    """A neuron's final value; ``rank`` 1 is the highest value."""

    __tablename__ = "job_neurons"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    layer: Mapped[str] = mapped_column(String(200))
    index: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)
    lower: Mapped[float] = mapped_column(Float)
    upper: Mapped[float] = mapped_column(Float)
    samples: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))

    __table_args__ = (Index("ix_job_neurons_job_layer_rank", "job_id", "layer", "rank"),)


class JobCheckpoint(Base):
    """The estimator's state at its last round boundary, for resuming a job."""

    __tablename__ = "job_checkpoints"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    state: Mapped[bytes] = mapped_column(LargeBinary)
    iterations: Mapped[int] = mapped_column(Integer)
    saved_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class JobAblation(Base):
    """The check of a result: the metric after removing the top 1..K neurons, beside K random ones."""

    __tablename__ = "job_ablations"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    curve: Mapped[dict] = mapped_column(JSON)


def has_checkpoint() -> ColumnElement[bool]:
    """The job has partial estimates saved: ending it without a worker would lose them."""
    return exists().where(JobCheckpoint.job_id == Job.id)
