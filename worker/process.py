"""Setting up a process that runs jobs: its torch threads and its heap, once, before the job's first pass.

Every place that runs the estimator calls :func:`prepare_process`: the Celery worker and the embedded queue
(:func:`worker.runner.run_job`, :func:`worker.edit_runner.run_edit_job`), ``neuronshap estimate``, and the
benchmarks, so that they run as a job does and measure what a worker does. Each half says why in its own
module: :mod:`worker.threads` (how many threads, and why before the first parallel op) and :mod:`worker.heap`
(why freed memory stays in the process).
"""

from __future__ import annotations

from worker.heap import keep_freed_memory
from worker.threads import Threads, apply_threads

__all__ = ["prepare_process"]


def prepare_process(threads: int | None) -> Threads:
    """Apply the thread setting (``None``: ``NEURONSHAP_THREADS`` or the default, :func:`.apply_threads`) and keep
    freed memory; returns the threads applied."""
    applied = apply_threads(threads)
    keep_freed_memory()
    return applied
