"""How many threads torch uses in a process that runs jobs: ``NEURONSHAP_THREADS``, else from the cores it has.

Why a setting, and why this default. torch starts one intra-op thread per
core of the machine and splits every op between them, so each op waits for
its slowest thread, and OpenMP's waiting threads spin. A worker shares its
node (another worker, the API, a load generator): when a neighbour keeps a
core busy, the thread that shares that core runs a fraction of the time and
every op waits for it. On a 2-core machine shared with other work, two
threads ran the digits CNN's evaluations 5-20x slower than one, with or
without a process spinning on one core besides (``bench/bench_contention.py``,
``bench/results/contention.txt``), while one thread lost at most ~2x to the
spinning neighbour. So the default leaves a core to the neighbours: one
thread fewer than the cores this process may run on (at least one). The
cores are the process's CPU affinity (what a container's cpuset or
``taskset`` gives it), capped by a cgroup CPU quota (``docker run --cpus``)
when there is one, not the machine's count.

Set once per process, where a job runs (by :func:`worker.process.prepare_process`,
which says where that is), before the job's first parallel op: torch fixes its inter-op pool at its first
use, after which :func:`torch.set_num_interop_threads` refuses. torch is
imported inside :func:`apply_threads` only, so that importing this module
loads nothing heavy.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Threads", "allowed_cores", "apply_threads", "default_threads"]

log = logging.getLogger(__name__)

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" in µs, or "max <period>"


@dataclass(frozen=True)
class Threads:
    """What a job process runs with; a job's ``summary.threads``."""

    intra_op: int
    interop: int
    cores: int  # the cores this process may run on
    source: str  # "NEURONSHAP_THREADS" (or --threads) or "default"


def allowed_cores(cpu_max: Path = CPU_MAX) -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (rounded up) if one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this platform
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 file, or one we cannot read: the affinity stands
        pass
    return max(1, cores)


def default_threads(cores: int) -> int:
    """One thread fewer than the cores, at least one: a neighbour busy on one core then costs no op its wait."""
    return max(1, cores - 1)


_interop_fixed = False  # set_num_interop_threads succeeds once per process, before any parallel work


def apply_threads(setting: int | None) -> Threads:
    """Give torch ``setting`` threads (``None``: :func:`default_threads` of :func:`allowed_cores`); returns what it
    runs with. Intra-op threads are set on every call (cheap, and per OS thread under OpenMP: the embedded queue
    runs jobs on a thread of its own); inter-op threads only on the first, which is all torch allows."""
    import torch

    global _interop_fixed
    cores = allowed_cores()
    wanted = setting if setting is not None else default_threads(cores)
    if wanted < 1:
        raise ValueError(f"threads must be at least 1, not {wanted}")
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    if not _interop_fixed:
        _interop_fixed = True
        if torch.get_num_interop_threads() != wanted:
            try:
                torch.set_num_interop_threads(wanted)
            except RuntimeError as exc:  # parallel work already ran in this process: its pool stays as it is
                log.info("torch inter-op threads stay %d: %s", torch.get_num_interop_threads(), exc)
    threads = Threads(
        torch.get_num_threads(),
        torch.get_num_interop_threads(),
        cores,
        "NEURONSHAP_THREADS" if setting is not None else "default",
    )
    log.info(
        "torch threads: %d intra-op, %d inter-op (%s; %d cores allowed)",
        threads.intra_op,
        threads.interop,
        threads.source,
        threads.cores,
    )
    return threads
