"""The database: one engine per process, a session per request (``SessionDep``).

The schema is created only by Alembic migrations (``migrations/``);
:func:`migrate` runs them, for the API's start-up and the tests.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, cast

from fastapi import Depends, Request
from sqlalchemy import CursorResult, Engine, Executable, create_engine, event
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from .config import get_settings

# The database is unreachable (restarting, down, out of connections), as opposed to a request it refused:
# callers wait or answer 503 rather than fail the job or answer 500.
UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeout)
MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
log = logging.getLogger(__name__)


class Base(DeclarativeBase):
    pass


@lru_cache
def get_engine(url: str | None = None) -> Engine:
    url = url or get_settings().resolved_database_url
    if url.startswith("sqlite"):
        _make_sqlite_dir(url)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record) -> None:  # foreign keys and concurrent readers
            cur = conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


@lru_cache
def _make_sqlite_dir(url: str) -> None:
    """SQLite creates the file but not its directory; the embedded default must start on a fresh machine."""
    path = url.removeprefix("sqlite:///")
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def session_factory(url: str | None = None) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


def get_session(request: Request) -> Iterator[Session]:
    session = session_factory(request.app.state.settings.resolved_database_url)()
    try:
        yield session
    finally:
        try:
            session.close()
        except UNAVAILABLE as exc:
            # Closing rolls back what the request left open; on a connection the database dropped (a restart)
            # that ROLLBACK fails, though there is nothing to undo: the server ended the transaction with it.
            # Raised here, after the route has answered, it would surface as an unhandled error.
            log.warning("database connection lost while closing a request's session: %s", exc)


SessionDep = Annotated[Session, Depends(get_session)]


def rowcount(session: Session, statement: Executable) -> int:
    """Run an UPDATE or DELETE and return how many rows it matched: the guard of a conditional write.

    ``Session.execute`` is typed as returning a ``Result``, which has no ``rowcount``; for a DML statement it
    returns a ``CursorResult``, which has.
    """
    return cast("CursorResult[Any]", session.execute(statement)).rowcount


def migrate(url: str | None = None) -> None:
    """Bring the database schema to the newest migration."""
    from alembic import command
    from alembic.config import Config

    url = url or get_settings().resolved_database_url
    if url.startswith("sqlite"):
        _make_sqlite_dir(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["url"] = url  # not a config option: URLs may hold '%'

    command.upgrade(cfg, "head")
