"""Runs one job: the bridge between the database record, the estimator library and the live bus.

The runner claims a queued job with a lease (:func:`app.jobs.lifecycle.claim`:
a conditional update, so two deliveries of the same job never both run it),
keeps the lease renewed from a thread, builds the game from the job's uploads,
runs TMAB-Shapley from the job's last checkpoint if it has one, and on the
way publishes live estimates (throttled), saves checkpoints (throttled) and
watches for a cancel request. Every change of the job's state goes through
:mod:`app.jobs.lifecycle`; the result (neurons, summary, ablation curve and
final state) is written in one transaction, so it is whole or absent.

Errors in the user's input (a layer glob that matches nothing, data the model
rejects) fail the job with the library's message; anything else fails it
with a short message and the traceback goes to the worker's log only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

from sqlalchemy.orm import Session, sessionmaker

from app.core.blobs import BlobStore
from app.core.bus import Bus
from app.core.clock import now
from app.core.config import Settings
from app.core.db import UNAVAILABLE, session_factory
from app.jobs import lifecycle
from app.jobs.lifecycle import Lease
from app.jobs.models import Job, JobCheckpoint
from app.jobs.schemas import Progress as ProgressView
from app.jobs.spec import JobSpec
from app.jobs.states import JobState
from worker.process import prepare_process
from worker.shapley import (
    Estimate,
    NeuronGame,
    Progress,
    TMABConfig,
    UserInputError,
    ablation_curve,
    ranked_neurons,
    run_summary,
    run_tmab,
)
from worker.shapley.errors import DataError, ModelError, SpecError
from worker.shapley.report import eta_s as _eta
from worker.shapley.report import no_evidence_message
from worker.shapley.tmab import PassProgress
from worker.translate import OutOfTime, build_game
from worker.upload_names import link

log = logging.getLogger(__name__)

ERROR_TYPES = {ModelError: "model-error", DataError: "data-error", SpecError: "spec-error"}
T = TypeVar("T")


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def run_job(
    job_id: str, settings: Settings, bus: Bus, should_exit: Callable[[], bool] | None = None
) -> JobState | None:
    """Run a job to its end; returns its new state, or None when it was not (or stopped being) ours to run.

    ``should_exit`` is the worker shutting down: the job stops at the next
    pass, saves a checkpoint and goes back to ``queued`` (or stays ``cancelling``) for the next worker.
    """
    db = session_factory(settings.resolved_database_url)
    lease = _Keeper(db, Lease(job_id, worker_identity(), settings.lease_s))
    patient = _Patience(job_id, settings.db_outage_s)
    job = patient(lambda: _in(db, lambda session: lifecycle.claim(session, bus, lease.lease)))
    if job is None:
        log.info("job %s: not claimable (finished, cancelled, deleted or leased by another worker); skipped", job_id)
        return None
    threads = prepare_process(settings.threads)  # before the job's first parallel op (worker/process.py)
    reporter = _Reporter(job_id, settings, bus, db, lease, should_exit or (lambda: False))
    with lease.kept():
        try:
            checkpoint = patient(lambda: _checkpoint(db, job_id))  # a database outage waited out here is not run time
            started_at = time.monotonic()  # max_seconds counts from here: loading and building are part of the run
            with tempfile.TemporaryDirectory(prefix="neuronshap-") as tmp:
                # A resumed job has evidence in its checkpoint: only a fresh one can run out of time while loading.
                files = job_files(job, settings, Path(tmp))
                game, config = _build(job, settings, files, started_at if checkpoint is None else None)
            resume = checkpoint.state if checkpoint is not None else None
            reporter.start(game, config, started_at, resume is not None)
            estimate = run_tmab(
                game,
                config,
                resume_from=resume,
                on_progress=reporter.on_progress,
                should_stop=reporter.should_stop,
                on_pass=reporter.on_pass,
                started_at=started_at,
            )
        except UNAVAILABLE:
            raise  # an outage longer than our patience: the lease expires and a reconciler sends the job again
        except UserInputError as exc:
            error = {
                "type": ERROR_TYPES.get(type(exc), "invalid-input"),
                "title": "The job's input was rejected",
                "detail": str(exc),
            }
            return patient(lambda: _in(db, lambda session: lifecycle.fail(session, bus, lease.lease, error)))
        except OutOfTime as exc:
            error = {"type": "no-evidence", "title": "The run gathered no evidence", "detail": str(exc)}
            log.warning("job %s: %s", job_id, exc)
            return patient(lambda: _in(db, lambda session: lifecycle.fail(session, bus, lease.lease, error)))
        except Exception as exc:
            log.exception("job %s: error in the worker", job_id)
            error = {
                "type": "internal",
                "title": "The worker failed",
                "detail": f"The worker failed on this job ({type(exc).__name__}); the operator has the details "
                "in its log.",
            }
            return patient(lambda: _in(db, lambda session: lifecycle.fail(session, bus, lease.lease, error)))

        if lease.lost:
            log.warning("job %s: lease lost to another worker; this copy stops without writing", job_id)
            return None
        if estimate.stop_reason == "stopped" and reporter.exiting:
            reporter.save_checkpoint()  # the worker is shutting down: keep the work done so far, hand the job back
            return patient(lambda: _in(db, lambda session: lifecycle.hand_back(session, bus, lease.lease)))
        empty = no_evidence_message(estimate)
        if empty is not None and estimate.stop_reason != "stopped":
            # Nothing was measured: a success would hand pipelines a list of placeholder zeros (docs/API.md).
            error = {"type": "no-evidence", "title": "The run gathered no evidence", "detail": empty}
            log.warning("job %s: %s", job_id, empty)
            return patient(lambda: _in(db, lambda session: lifecycle.fail(session, bus, lease.lease, error)))
        summary = run_summary(game, estimate)
        for warning in summary["warnings"]:
            log.warning("job %s: %s", job_id, warning)
        neurons = ranked_neurons(game, estimate)
        summary |= {
            "publish_s": reporter.publish_s,
            "checkpoints": reporter.checkpoints,
            "resumed_from_iteration": checkpoint.iterations if checkpoint is not None else None,
            "threads": asdict(threads),
        }
        progress = reporter.progress_dict(estimate)
        if estimate.stop_reason == "stopped":  # a cancel request: the partial estimates are the result
            outcome, curve = JobState.CANCELLED, None
        else:
            outcome, curve = (
                JobState.SUCCEEDED,
                ablation_curve(game, estimate.values, k=settings.ablation_k, seed=config.seed),
            )
        return patient(
            lambda: _in(
                db,
                lambda session: lifecycle.finish(session, bus, lease.lease, outcome, neurons, summary, progress, curve),
            )
        )


def _in(db: sessionmaker[Session], step: Callable[[Session], T]) -> T:
    """One lifecycle step on a session of its own."""
    with db() as session:
        return step(session)


@dataclass
class _Patience:
    """Runs a database step again while the database is unreachable, for up to ``seconds``.

    A restarting PostgreSQL must not cost a finished result (hours of GPU time)
    or fail a job that has not started: the step waits the outage out, with
    backoff. Each step is one transaction guarded by the lease, so running it
    again is safe. Past ``seconds`` the error propagates; the job's lease then
    expires and a reconciler sends it again from its last checkpoint.
    """

    job_id: str
    seconds: float

    def __call__(self, step: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.seconds
        delay = 0.5
        while True:
            try:
                return step()
            except UNAVAILABLE as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning(
                    "job %s: database unavailable (%s); retrying in %.1f s",
                    self.job_id,
                    str(exc).splitlines()[0],
                    delay,
                )
                time.sleep(delay)
                delay = min(2 * delay, 5.0)


def _checkpoint(db: sessionmaker[Session], job_id: str) -> JobCheckpoint | None:
    with db() as session:
        return session.get(JobCheckpoint, job_id)


class _Keeper:
    """Keeps this worker's lease on a job: renewed from a thread while the job runs.

    Another worker can claim the job only once the lease has expired (its
    holder is dead or cut off); the holder then finds the lease gone at its
    next renewal, stops, and writes nothing more.
    """

    def __init__(self, db: sessionmaker[Session], lease: Lease) -> None:
        self.db, self.lease = db, lease
        self.lost = False
        self._stop = threading.Event()

    @contextlib.contextmanager
    def kept(self) -> Iterator[None]:
        thread = threading.Thread(target=self._renew, name=f"lease-{self.lease.job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease.seconds / 3):
            try:
                renewed = _in(self.db, lambda session: lifecycle.renew(session, self.lease))
            except Exception as exc:  # the database is away: try again; the lease covers a few misses
                log.warning("job %s: lease not renewed: %s", self.lease.job_id, exc)
                continue
            if not renewed:
                self.lost = True
                return


def job_files(job: Job, settings: Settings, tmp: Path) -> tuple[Path, Path]:
    """The job's model and data, linked into ``tmp`` under the names their client gave them (worker/upload_names.py
    says why)."""
    store = BlobStore(settings.resolved_blob_dir)
    return (
        link(tmp, store.path(job.model_blob), job.model_name, job.model_format, "model"),
        link(tmp, store.path(job.data_blob), job.data_name, job.data_format, "data"),
    )


def _build(
    job: Job, settings: Settings, files: tuple[Path, Path], started_at: float | None
) -> tuple[NeuronGame, TMABConfig]:
    """The game and the estimator settings the job's spec asks for, on its :func:`job_files`."""
    if job.model_format == "pt2" and not settings.allow_pickle_models:
        raise ModelError("This worker does not load .pt2 programs (loading one unpickles); upload an ONNX export.")
    (model_path, data_path), tmp = files, files[0].parent
    try:
        memory = None if settings.activation_memory_mb is None else settings.activation_memory_mb << 20
        return build_game(
            JobSpec.model_validate(job.spec), model_path, data_path, started_at=started_at, memory_bytes=memory
        )
    except UserInputError as exc:  # the loaders name the path they read: the client's file name, not our temp path
        raise type(exc)(str(exc).replace(f"{tmp}{os.sep}", "")) from exc


@dataclass
class _Reporter:
    """The run's side channels, each throttled: live bounds, checkpoints, cancel requests, shutdown."""

    job_id: str
    settings: Settings
    bus: Bus
    db: sessionmaker[Session]
    lease: _Keeper
    should_exit: Callable[[], bool]
    game: NeuronGame | None = None
    config: TMABConfig | None = None
    last: Progress | None = None
    setup_s: float = 0.0
    _neurons: list = field(default_factory=list)  # the last round's ranked neurons, shown while a round runs
    publish_s: float = 0.0  # time spent building and publishing live state: the cost the service adds to a run
    checkpoints: int = 0
    exiting: bool = False
    cancelled: bool = False
    _published_at: float = 0.0
    _counted_at: float = 0.0
    _checkpointed_at: float = field(default_factory=time.monotonic)
    _polled_at: float = 0.0

    def start(self, game: NeuronGame, config: TMABConfig, started_at: float, resuming: bool = False) -> None:
        self.game, self.config = game, config
        self.setup_s = time.monotonic() - started_at
        if not resuming:  # a resumed job shows its checkpoint's progress until its first pass
            self._publish_counters(0, 0, 0, self.setup_s, game.n_players, config)

    def on_pass(self, p: PassProgress) -> None:
        """Counters within a round (no checkpoint here), at most once per publish interval."""
        t = time.monotonic()
        if t - max(self._published_at, self._counted_at) < self.settings.publish_interval_s:
            return
        self._counted_at = t  # its own clock: a round's publish (with bounds) is never crowded out by these
        assert self.game is not None
        self._publish_counters(
            p.iterations, p.evaluations, p.round_evaluations, p.elapsed_s, p.undecided, p.config, live_last=True
        )
        self.publish_s += time.monotonic() - t

    def _publish_counters(
        self,
        iterations: int,
        evaluations: int,
        round_evaluations: int,
        elapsed_s: float,
        undecided: int,
        config: TMABConfig,
        live_last: bool = False,
    ) -> None:
        assert self.game is not None
        last = self.last.estimate if self.last is not None else None
        progress_now = ProgressView(
            iterations=iterations,
            evaluations=evaluations,
            players=self.game.n_players,
            undecided=undecided,
            v_full=last.v_full if last is not None else None,
            v_empty=last.v_empty if last is not None else None,
            elapsed_s=round(elapsed_s, 3),
            eta_s=_eta(config, elapsed_s, iterations, evaluations),
            round_evaluations=round_evaluations,
            setup_s=round(self.setup_s, 3),
        ).model_dump()
        live = {
            "state": JobState.CANCELLING if self.cancelled else JobState.RUNNING,
            "progress": progress_now,
            "neurons": self._neurons if live_last else [],
            "updated_at": now().isoformat(),
        }
        try:
            self.bus.set_live(self.job_id, live)
            self.bus.publish(self.job_id, "progress", progress_now)
        except Exception as exc:  # the live view is best effort; the run goes on
            log.warning("job %s: live state not published: %s", self.job_id, exc)

    def on_progress(self, progress: Progress) -> None:
        self.last = progress
        t = time.monotonic()
        if t - self._published_at >= self.settings.publish_interval_s:
            self._published_at = t
            self.publish(progress)
            self.publish_s += time.monotonic() - t
        if t - self._checkpointed_at >= self.settings.checkpoint_interval_s:
            self._checkpointed_at = t
            self.save_checkpoint()

    def publish(self, progress: Progress) -> None:
        # start() has run: run_tmab, which reports progress, is called after it.
        assert self.game is not None and self.config is not None, "publish() before start()"
        estimate = progress.estimate
        neurons = ranked_neurons(self.game, estimate)
        self._neurons = neurons
        progress_now = self.progress_dict(estimate, progress.undecided)
        live = {
            "state": JobState.CANCELLING if self.cancelled else JobState.RUNNING,
            "progress": progress_now,
            "neurons": neurons,
            "updated_at": now().isoformat(),
        }
        try:
            self.bus.set_live(self.job_id, live)
            self.bus.publish(self.job_id, "progress", progress_now)
            shown = min(len(neurons), max(2 * self.config.top_k, 20))
            head = neurons[-shown:][::-1] if self.config.mode == "bottom" else neurons[:shown]
            self.bus.publish(self.job_id, "bounds", {"neurons": head, "of": len(neurons)})
        except Exception as exc:  # the live view is best effort; the run goes on
            log.warning("job %s: live state not published: %s", self.job_id, exc)

    def save_checkpoint(self) -> None:
        if self.last is None:
            return
        state, estimate = self.last.checkpoint(), self.last.estimate
        progress = self.progress_dict(estimate, self.last.undecided)
        try:
            if not _in(
                self.db,
                lambda session: lifecycle.checkpoint(session, self.lease.lease, state, estimate.iterations, progress),
            ):
                self.lease.lost = True
                return
            self.checkpoints += 1
        except Exception as exc:  # a missed checkpoint costs only work since the previous one
            log.warning("job %s: checkpoint not saved: %s", self.job_id, exc)

    def should_stop(self) -> bool:
        if self.lease.lost:
            return True
        if self.should_exit():
            self.exiting = True
            return True
        t = time.monotonic()
        if not self.cancelled and t - self._polled_at >= self.settings.cancel_poll_s:
            self._polled_at = t
            try:
                with self.db() as session:
                    job = session.get(Job, self.job_id)
                    if job is None:  # its row is gone; the lease's renewal finds that out and stops the run
                        raise LookupError("the job is no longer in the database")
                    self.cancelled = bool(job.cancel_requested)
            except Exception as exc:
                log.warning("job %s: cancel flag not read: %s", self.job_id, exc)
        return self.cancelled

    def progress_dict(self, estimate: Estimate, undecided: int | None = None) -> dict:
        """The job's ``progress`` (:class:`app.jobs.schemas.Progress`), as stored and published."""
        undecided = estimate.status.count("undecided") if undecided is None else undecided
        return ProgressView(
            iterations=estimate.iterations,
            evaluations=estimate.evaluations,
            players=len(estimate.status),
            undecided=undecided,
            v_full=estimate.v_full,
            v_empty=estimate.v_empty,
            elapsed_s=round(estimate.elapsed_s, 3),
            eta_s=_eta(estimate.config, estimate.elapsed_s, estimate.iterations, estimate.evaluations),
            setup_s=round(self.setup_s, 3),
        ).model_dump()
