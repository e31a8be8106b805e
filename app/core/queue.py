"""Handing jobs to workers: Celery over a broker, or a thread of this process.

Both adapters take only an id, a job's (:meth:`Queue.enqueue`) or an edit's
(:meth:`Queue.enqueue_edit`): the job or edit itself is in the database, which
is the record of what to run. With a broker configured, :func:`celery_app` is
shared by the API (to send) and ``worker.tasks`` (to run).

Celery acknowledges a message as its task starts (``task_acks_late`` off),
not when the job ends: with Redis as the broker an unacknowledged message goes
back to the queue after the visibility timeout (12 h here), and jobs run for
hours. The Redis transport carries that acknowledgement out from the worker's
event loop, which the ``solo`` pool does not turn while a job runs, so the
message stays in kombu's ``unacked`` set until the job ends (seen in the
tests): a job running past the visibility timeout is delivered again, and the
second delivery finds the job's lease held (or the job ended) and skips it,
because the claim is a conditional update. A job whose worker dies is
recovered from the database (its state and checkpoint), not from the broker.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

from .config import Settings
from .db import UNAVAILABLE, session_factory

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.orm import Session

    from .bus import Bus

TASK_RUN_JOB = "neuronshap.run_job"
TASK_RUN_EDIT = "neuronshap.run_edit"

log = logging.getLogger(__name__)

# Runs one job to its end: (job id, settings, bus, should_exit). The worker's runner, handed to the embedded queue
# where the service is assembled (``neuronshap.server``), so that nothing in ``app`` imports the worker.
RunJob = Callable[[str, Settings, "Bus", Callable[[], bool]], object]
# Runs one edit to its end, with the same arguments (an edit id): ``worker.edit_runner.run_edit``.
RunEdit = RunJob


class Queue(Protocol):
    def enqueue(self, job_id: str) -> None: ...
    def enqueue_edit(self, edit_id: str) -> None: ...
    def waiting(self) -> set[str] | None:
        """The jobs and edits whose message waits in the queue (ids ``j_…``, ``e_…``); None when it cannot tell."""

    def ping(self) -> None: ...


@lru_cache
def celery_app(broker_url: str, queue: str) -> Celery:
    """The Celery app on ``broker_url`` whose tasks go to ``queue`` (``settings.queue_name``)."""
    from celery import Celery

    app = Celery("neuronshap", broker=broker_url)
    app.conf.update(
        task_default_queue=queue,
        task_acks_late=False,
        task_ignore_result=True,
        # A worker takes a message only when it is idle: a message reserved behind a job that runs for hours would
        # wait for hours, and be lost with the worker if it died.
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 12 * 3600},
        task_serializer="json",
        accept_content=["json"],
    )
    return app


class CeleryQueue:
    def __init__(self, broker_url: str, queue: str) -> None:
        self.app = celery_app(broker_url, queue)
        self.queue = queue

    def enqueue(self, job_id: str) -> None:
        self.app.send_task(TASK_RUN_JOB, args=[job_id], queue=self.queue)

    def enqueue_edit(self, edit_id: str) -> None:
        self.app.send_task(TASK_RUN_EDIT, args=[edit_id], queue=self.queue)

    def waiting(self) -> set[str] | None:
        """Read from the broker's list (Redis only): lets the reconciler tell a job that waits its turn in a deep
        queue from one whose message was lost, so that it sends only the latter again."""
        url = self.app.conf.broker_url
        if not url.startswith(("redis://", "rediss://")):
            return None
        import redis

        client = redis.Redis.from_url(url, socket_timeout=10)
        try:
            messages = client.lrange(self.queue, 0, -1)
        finally:
            client.close()
        ids = set()
        for raw in messages:
            with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                message = json.loads(raw)
                body = message["body"]
                if message["properties"].get("body_encoding") == "base64":
                    body = base64.b64decode(body)
                ids.add(json.loads(body)[0][0])
        return ids

    def ping(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)


class ThreadQueue:
    """The embedded default: jobs run one at a time on a thread of the API process, through ``run_job``; edits
    one at a time on a second thread, through ``run_edit``, so that an edit (seconds) never waits behind a job
    (hours)."""

    def __init__(self, settings: Settings, bus: Bus, run_job: RunJob, run_edit: RunEdit | None = None) -> None:
        self.settings, self.bus, self.run_job, self.run_edit = settings, bus, run_job, run_edit
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neuronshap-job")
        self._edits = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neuronshap-edit")
        self._waiting: set[str] = set()
        self._lock = threading.Lock()

    def enqueue(self, job_id: str) -> None:
        with self._lock:
            self._waiting.add(job_id)
        self._pool.submit(self._run, self.run_job, job_id)

    def enqueue_edit(self, edit_id: str) -> None:
        if self.run_edit is None:
            raise RuntimeError("this app was built without an edit runner (neuronshap.server wires one)")
        with self._lock:
            self._waiting.add(edit_id)
        self._edits.submit(self._run, self.run_edit, edit_id)

    def waiting(self) -> set[str]:
        with self._lock:
            return set(self._waiting)

    def _run(self, runner: RunJob, ident: str) -> None:
        with self._lock:
            self._waiting.discard(ident)
        try:
            runner(ident, self.settings, self.bus, self._stopping.is_set)
        except Exception:  # the runner records errors itself; this is a bug in it, keep the thread alive
            log.exception("%s: runner failed", ident)

    def ping(self) -> None:
        return None

    def shutdown(self) -> None:
        """Stop: a running job checkpoints and goes back to ``queued``; the next start resumes it."""
        self._stopping.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._edits.shutdown(wait=True, cancel_futures=True)


def send_each(
    settings: Settings,
    enqueue: Callable[[str], None],
    mark_sent: Callable[[Session, Iterable[str]], None],
    ids: list[str],
) -> list[str]:
    """Hand each id (jobs' or edits') to ``enqueue`` and record when with ``mark_sent``; one that cannot be sent
    now is tried again later (a reconciler finds it unsent)."""
    sent = []
    for ident in ids:
        try:
            enqueue(ident)
        except Exception as exc:
            log.warning("%s: not queued (%s); will retry", ident, exc)
            continue
        sent.append(ident)
    if sent:
        try:
            with session_factory(settings.resolved_database_url)() as session:
                mark_sent(session, sent)
        except UNAVAILABLE as exc:  # unrecorded, they look unsent: a reconciler sends them again, harmlessly
            log.warning("%s: sent, but the time of sending was not recorded: %s", sent, exc)
    return sent


def make_queue(settings: Settings, bus: Bus, run_job: RunJob | None, run_edit: RunEdit | None = None) -> Queue:
    """Celery when a broker is configured; else the embedded thread, which needs the runner."""
    if settings.broker_url:
        return CeleryQueue(settings.broker_url, settings.queue_name)
    if run_job is None:
        raise RuntimeError(
            "No broker is configured (NEURONSHAP_BROKER_URL) and this app was built without a job "
            "runner for the embedded queue: start the service with `neuronshap serve` (or uvicorn "
            "--factory neuronshap.server:app), or set NEURONSHAP_BROKER_URL and run workers."
        )
    return ThreadQueue(settings, bus, run_job, run_edit)
