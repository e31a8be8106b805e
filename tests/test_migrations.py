"""The schema comes from migrations only, and they match the models, on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

# Imported for their side effect: the models register their tables on Base.metadata. (All bind `app`;
# ruff reports only the last binding as unused.)
import app.edits.models
import app.jobs.models
import app.keys.models  # noqa: F401
from app.core.db import Base, migrate
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
