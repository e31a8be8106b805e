"""All settings of the service, read once from the environment (prefix ``NEURONSHAP_``).

With nothing set, the service runs on embedded defaults: SQLite under
``var/``, an in-process queue and an in-process event bus. Setting
``NEURONSHAP_DATABASE_URL``, ``NEURONSHAP_BROKER_URL`` and
``NEURONSHAP_REDIS_URL`` switches to PostgreSQL, Celery and Redis; the code
paths above the adapters are the same.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEURONSHAP_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("var"), description="where the embedded database and the blob store live")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir")
    broker_url: str | None = Field(None, description="Celery broker URL; default an in-process queue")
    redis_url: str | None = Field(None, description="Redis for live bounds and events; default in-process")
    queue_name: str = Field("jobs", min_length=1, description="the Celery queue the API sends to and workers consume")
    redis_prefix: str = Field("ns:", description="prefix of every key the bus keeps in Redis")
    blob_dir: Path | None = Field(None, description="shared directory of uploads; default data_dir/blobs")
    max_model_bytes: int = 512 << 20
    max_data_bytes: int = 2 << 30
    max_spec_bytes: int = 64 << 10
    publish_interval_s: float = Field(1.0, description="least time between two live-bound publications of a job")
    checkpoint_interval_s: float = Field(60.0, description="least time between two checkpoints of a job")
    cancel_poll_s: float = Field(1.0, description="how often a running job looks for a cancel request")
    cursor_secret: str = Field(
        "dev-only-change-me", description="signs page cursors; set the same value on every API replica"
    )
    allow_pickle_models: bool = Field(False, description="accept .pt2 uploads, whose loading unpickles (runs code)")
    preflight_timeout_s: float = Field(
        60.0,
        ge=0,
        description="how long a submission's check (model loads, takes the data, fits the spec) may take before "
        "the job is accepted unchecked and the worker judges it; 0: no check",
    )
    migrate_on_start: bool = Field(True, description="run the migrations when the API starts")
    ablation_k: int = Field(10, ge=1, description="the ablation check removes the top 1..K neurons")
    lease_s: float = Field(60.0, gt=0, description="a running job's lease; its worker renews it every third of this")
    requeue_after_s: float = Field(
        60.0, gt=0, description="a queued job sent this long ago and not in the queue is sent again"
    )
    db_outage_s: float = Field(
        900.0, ge=0, description="how long a worker waits out a database outage before giving up a job's write"
    )
    reconcile_interval_s: float = Field(30.0, gt=0, description="how often a worker looks for jobs to recover")
    require_api_keys: bool = Field(
        False, description="demand `Authorization: Bearer <key>`; off: one tenant, `default`"
    )
    max_active_jobs_per_tenant: int = Field(
        20, ge=1, description="queued and running jobs a tenant may have (429 beyond)"
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch threads of a process that runs jobs; default one fewer than the cores it may run on "
        "(its CPU affinity and CPU quota), at least 1 (worker/threads.py says why)",
    )
    activation_memory_mb: int | None = Field(
        None,
        ge=1,
        description="activation memory one forward pass of a job may use (MiB); it bounds coalitions per pass, and "
        "a model that cannot fit one coalition in it fails saying how much it needs; default: half the "
        "memory of the device (the machine's on the CPU, the GPU's own)",
    )

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'neuronshap.db').as_posix()}"

    @property
    def max_request_bytes(self) -> int:
        """The largest job submission: both files, the spec and room for the multipart framing."""
        return self.max_model_bytes + self.max_data_bytes + self.max_spec_bytes + (1 << 20)

    @property
    def resolved_blob_dir(self) -> Path:
        return self.blob_dir or self.data_dir / "blobs"


@lru_cache
def get_settings() -> Settings:
    return Settings()
