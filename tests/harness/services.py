"""The machine's PostgreSQL and Redis as the tests and the benchmarks use them, each run keeping to its own part.

A test run (a pytest session, or a benchmark run on its own) picks an id,
``RUN_ID``. Every stack it starts takes a :func:`namespace` of that run: a
Redis key prefix ``t<run>:<n>:`` for the bus and a Celery queue
``jobs-<run>-<n>``, so that two runs on one machine (two developers, a
developer and CI, a benchmark beside the suite) share the Redis database
without taking each other's jobs or reading each other's events, and nothing
is flushed. A namespace deletes its own keys when its stack ends
(:meth:`Namespace.drop`); :func:`sweep_run` deletes whatever of the run is left
(a stack killed mid-way), at the end of the session.

PostgreSQL: each stack gets a fresh schema of the ``test`` database
(:func:`postgres_schema`), dropped afterwards.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
from sqlalchemy import create_engine, text

from app.core.config import Settings

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379"
REDIS_DB = 13  # the tests' and benchmarks' broker and bus; runs share it, each in its own namespace
REDIS_URL = f"{REDIS}/{REDIS_DB}"

# What kombu's Redis transport keeps of a queue besides its list (the exchange of a Celery queue is its name),
# and the hash (with its index) where it holds a delivered message until the worker acknowledges it: shared by
# every queue of the database, each entry naming its queue.
KOMBU_BINDINGS = ("_kombu.binding.%s", "_kombu.binding_permanent.%s")
KOMBU_UNACKED, KOMBU_UNACKED_INDEX = "unacked", "unacked_index"

RUN_ENV = "NEURONSHAP_TEST_RUN"  # set for a subprocess (a benchmark's smoke run) to make it part of this run
RUN_ID = os.environ.get(RUN_ENV) or uuid.uuid4().hex[:8]
if not re.fullmatch(r"[0-9a-z]{1,32}", RUN_ID):
    raise RuntimeError(f"{RUN_ENV}={RUN_ID!r}: expected up to 32 lower-case letters and digits")


@dataclass(frozen=True)
class Namespace:
    """A Redis key prefix and a Celery queue that no other stack, of this run or another, uses."""

    prefix: str
    queue: str

    def settings(self) -> dict[str, str]:
        """The overrides of :class:`app.core.config.Settings` that put a stack in this namespace."""
        return {"redis_prefix": self.prefix, "queue_name": self.queue}

    def drop(self, url: str = REDIS_URL) -> int:
        """Delete the namespace's keys (the bus's, the queue's list, kombu's bindings of it) and its messages
        left unacknowledged (a worker killed or stopped holding one); returns how many."""
        return _delete(
            url, self.queue, f"{self.prefix}*", self.queue, *(binding % self.queue for binding in KOMBU_BINDINGS)
        )


def namespace(run: str = RUN_ID) -> Namespace:
    """A fresh namespace of the run (random per call, so that processes of one run do not collide either)."""
    part = secrets.token_hex(3)
    return Namespace(f"t{run}:{part}:", f"jobs-{run}-{part}")


def sweep_run(url: str = REDIS_URL, run: str = RUN_ID) -> int:
    """Delete every key of the run (only its own: other runs may be going on); returns how many."""
    queues = f"jobs-{run}-*"
    return _delete(url, queues, f"t{run}:*", queues, *(binding % queues for binding in KOMBU_BINDINGS))


def _delete(url: str, queues: str, *patterns: str) -> int:
    """Delete the keys matching ``patterns`` and the unacknowledged messages of the queues matching ``queues``.

    Left in kombu's hash, such a message would go back to its queue after the visibility timeout (12 h), when
    any worker on the database restores it: a queue of a run long over, that nobody reads or deletes."""
    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    try:
        keys = {key for pattern in patterns for key in client.scan_iter(match=pattern, count=1000)}
        deleted = client.delete(*keys) if keys else 0
        for tag, raw in client.hscan_iter(KOMBU_UNACKED, count=1000):
            with contextlib.suppress(ValueError, TypeError):
                _, _, routing_key = json.loads(raw)  # (message, exchange, routing key): the queue
                if fnmatch.fnmatchcase(routing_key, queues):
                    deleted += client.hdel(KOMBU_UNACKED, tag)
                    client.zrem(KOMBU_UNACKED_INDEX, tag)
        return deleted
    finally:
        client.close()


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """A database URL whose tables live in a fresh schema of the test database, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{POSTGRES}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def full_settings(tmp: Path, database_url: str, ns: Namespace, **overrides: object) -> Settings:
    """The settings of a full stack: PostgreSQL at ``database_url``, Redis as broker and bus under ``ns``, the blob
    store in ``tmp``, migrations run by the caller."""
    return Settings(
        data_dir=tmp,
        database_url=database_url,
        broker_url=REDIS_URL,
        redis_url=REDIS_URL,
        blob_dir=tmp / "blobs",
        migrate_on_start=False,
        **(ns.settings() | overrides),
    )
