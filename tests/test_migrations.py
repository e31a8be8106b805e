"""The schema comes from migrations only, and they match the models, on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from app.core.db import Base, migrate
import app.jobs.models  # noqa: F401  (registers the tables on Base.metadata)
import app.keys.models  # noqa: F401
from tests.harness.services import postgres_schema


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.service)])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    with postgres_schema() as url:
        yield url


def test_migrations_create_exactly_the_models_schema(database_url):
    migrate(database_url)
    engine = create_engine(database_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []
