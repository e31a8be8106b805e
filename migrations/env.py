"""Alembic environment: the URL comes from the caller (app.core.db.migrate) or the settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from app.core.config import get_settings

config = context.config
url = config.attributes.get("url") or get_settings().resolved_database_url


def run() -> None:
    if context.is_offline_mode():
        context.configure(url=url, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()
