"""Live state of running jobs: a snapshot per job and an event stream per job.

The worker publishes; the API reads. With Redis configured the snapshot is a
key and the events a Redis Stream (``XADD`` with a length cap), so API
replicas and workers on other machines share them; otherwise
:class:`MemoryBus` keeps both in the process (the embedded default, where the
worker is a thread of the API process). Event ids are stream ids
(``<ms>-<seq>``) in both, so ``Last-Event-ID`` means the same thing.

Nothing here is the record of a job: PostgreSQL is. A lost snapshot or
stream only costs the live view until the next publication.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

from .config import Settings

log = logging.getLogger(__name__)

STREAM_MAXLEN = 1000  # events kept per job: a client that falls further behind restarts from the snapshot
LIVE_TTL_S = 7 * 24 * 3600  # a forgotten job's live state goes away on its own
ENDED_TTL_S = 24 * 3600  # a finished job's events stay replayable this long; its record is in the database

Event = tuple[str, str, dict]  # (id, type, data)
_XReadReply = list[tuple[bytes, list[tuple[bytes | str, dict[bytes, bytes]]]]]  # what RedisBus.read gets from XREAD


class Bus(Protocol):
    def set_live(self, job_id: str, snapshot: dict) -> None: ...
    def get_live(self, job_id: str) -> dict | None: ...
    def publish(self, job_id: str, kind: str, data: dict) -> str: ...
    def read(self, job_id: str, after: str | None, block_s: float) -> list[Event]: ...
    def ended(self, job_id: str) -> None: ...
    def clear(self, job_id: str) -> None: ...
    def ping(self) -> None: ...


def _id_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def valid_event_id(event_id: str) -> bool:
    try:
        _id_key(event_id)
        return True
    except ValueError:
        return False


class MemoryBus:
    """The bus inside one process: for the embedded default and for tests of the API alone."""

    def __init__(self) -> None:
        self._live: dict[str, dict] = {}
        self._streams: dict[str, deque[Event]] = {}
        self._changed = threading.Condition()
        self._last = (0, 0)

    def _next_id(self) -> str:
        ms = int(time.time() * 1000)
        self._last = (ms, 0) if ms > self._last[0] else (self._last[0], self._last[1] + 1)
        return f"{self._last[0]}-{self._last[1]}"

    def set_live(self, job_id: str, snapshot: dict) -> None:
        with self._changed:
            self._live[job_id] = json.loads(json.dumps(snapshot))  # a copy, as Redis would hold

    def get_live(self, job_id: str) -> dict | None:
        with self._changed:
            return self._live.get(job_id)

    def publish(self, job_id: str, kind: str, data: dict) -> str:
        with self._changed:
            event_id = self._next_id()
            self._streams.setdefault(job_id, deque(maxlen=STREAM_MAXLEN)).append((event_id, kind, data))
            self._changed.notify_all()
            return event_id

    def read(self, job_id: str, after: str | None, block_s: float) -> list[Event]:
        after_key = _id_key(after) if after else (-1, -1)
        deadline = time.monotonic() + block_s
        with self._changed:
            while True:
                events = [e for e in self._streams.get(job_id, ()) if _id_key(e[0]) > after_key]
                left = deadline - time.monotonic()
                if events or left <= 0:
                    return events
                self._changed.wait(left)

    def ended(self, job_id: str) -> None:
        """The job is over: its live snapshot goes (reads use the database); its events stay for late readers."""
        with self._changed:
            self._live.pop(job_id, None)

    def clear(self, job_id: str) -> None:
        with self._changed:
            self._live.pop(job_id, None)
            self._streams.pop(job_id, None)

    def ping(self) -> None:
        return None


class RedisBus:
    """The bus in Redis: ``<prefix>job:<id>:live`` (JSON) and the stream ``<prefix>job:<id>:events``.

    The prefix (``NEURONSHAP_REDIS_PREFIX``, default ``ns:``) lets deployments, or test runs, share one Redis
    database without reading each other's jobs."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)
        self._prefix = prefix

    def _key(self, job_id: str, what: str) -> str:
        return f"{self._prefix}job:{job_id}:{what}"

    def set_live(self, job_id: str, snapshot: dict) -> None:
        self._redis.set(self._key(job_id, "live"), json.dumps(snapshot), ex=LIVE_TTL_S)

    def get_live(self, job_id: str) -> dict | None:
        raw = self._redis.get(self._key(job_id, "live"))
        return None if raw is None else json.loads(raw)

    def publish(self, job_id: str, kind: str, data: dict) -> str:
        key = self._key(job_id, "events")
        with self._redis.pipeline() as pipe:
            pipe.xadd(key, {"type": kind, "data": json.dumps(data)}, maxlen=STREAM_MAXLEN, approximate=True)
            pipe.expire(key, LIVE_TTL_S)
            event_id, _ = pipe.execute()
        return event_id.decode() if isinstance(event_id, bytes) else event_id

    def read(self, job_id: str, after: str | None, block_s: float) -> list[Event]:
        key = self._key(job_id, "events")
        reply = self._redis.xread({key: after or "0-0"}, block=max(1, int(block_s * 1000)), count=500)
        events: list[Event] = []
        # redis-py types every reply loosely; a RESP2 client without decode_responses answers XREAD with
        # [(stream, [(id, {field: value})])] in bytes, or None when the block timed out.
        for _, entries in cast("_XReadReply | None", reply) or ():
            for raw_id, fields in entries:
                event_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
                events.append((event_id, fields[b"type"].decode(), json.loads(fields[b"data"])))
        return events

    def ended(self, job_id: str) -> None:
        with self._redis.pipeline() as pipe:
            pipe.delete(self._key(job_id, "live"))
            pipe.expire(self._key(job_id, "events"), ENDED_TTL_S)
            pipe.execute()

    def clear(self, job_id: str) -> None:
        self._redis.delete(self._key(job_id, "live"), self._key(job_id, "events"))

    def ping(self) -> None:
        self._redis.ping()


def best_effort(job_id: str, what: str, call: Callable[[], object]) -> None:
    """Do ``call`` on the bus if it answers. Live state and events are a convenience for followers; the database
    record is the truth, so a bus that is down must not fail (or undo) the change it would have shown."""
    try:
        call()
    except Exception as exc:
        log.warning("job %s: %s failed: %s", job_id, what, exc)


def announce(bus: Bus, job_id: str, kind: str, data: dict) -> None:
    """Publish an event if the bus answers (:func:`best_effort`)."""
    best_effort(job_id, f"publishing event {kind}", lambda: bus.publish(job_id, kind, data))


def announce_end(bus: Bus, job_id: str, state: dict) -> None:
    """A job's last events (its state, then ``done``), and its live snapshot dropped, if the bus answers."""
    announce(bus, job_id, "state", state)
    announce(bus, job_id, "done", {"state": state["state"]})
    best_effort(job_id, "dropping the live state", lambda: bus.ended(job_id))


def make_bus(settings: Settings) -> Bus:
    return RedisBus(settings.redis_url, settings.redis_prefix) if settings.redis_url else MemoryBus()
