"""Keeping freed memory in the process, so that a pass's tensors do not page-fault on every pass.

Why. glibc's malloc gives a block above its mmap threshold (128 KiB at
first, raised as such blocks are freed, to at most 32 MiB) a mapping of its
own and hands it back to the kernel when it is freed, and it trims the heap's
top whenever more than twice that threshold lies free there. A pass allocates
activations of the same few MiB every time, so every pass wrote to fresh pages,
and each first write to a page is a fault the kernel serves by zeroing it. On
the wide CNN's endgame passes (stars of 5 players, 10 lanes, batch 16) that
was 700k minor faults in 21 passes and 40 % of the time: 26.9 ms a pass, and
15.5 ms with the settings below (80k faults, the same peak memory), and a
wide-CNN run to its certified stop took 40.0 s instead of 58.8. The digits
CNN's star passes of first-layer flips went from 16.3 to 11.4 ms, but its
whole runs did not change (their tensors are mostly small).

What. The mmap threshold is fixed at glibc's largest (32 MiB), so blocks
below it come from the heap and are reused, and the heap keeps up to 1 GiB
free at its top before it gives any back. A worker's memory then stays near
its peak between passes, which the pass budget (half the machine) already
allows for. Blocks over 32 MiB are still mapped per pass.

Set once per process where a job runs, beside its threads, by
:func:`worker.process.prepare_process` (which says where that is). A C library
other than glibc is left as it is.
"""

from __future__ import annotations

import ctypes
import logging
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the largest glibc accepts
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as the module docstring says; False where the C library is not glibc or refuses."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        log.warning("glibc refused the malloc settings that keep freed memory; passes will page-fault more")
    return done
