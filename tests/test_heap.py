"""Freed memory stays in the process: a pass's next tensors reuse it instead of faulting in fresh pages."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Passes as the engine makes them: a chain of activations, each made from the last and freed once the next
# exists, 1-16 MiB, their size varying from pass to pass (the groups and lanes of a pass do). Prints the minor
# page faults of passes 5-29, after glibc's defaults or keep_freed_memory().
LOOP = """
import resource, sys, torch
from worker.heap import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
generator = torch.Generator().manual_seed(0)
for i in range(30):
    if i == 5:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(int(torch.randint(1 << 18, 4 << 20, (1,), generator=generator))).fill_(1.0)
    for _ in range(6):
        x = torch.relu(x) * 1.0
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, check=True)
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the C library is not glibc")
def test_a_pass_reuses_the_memory_the_last_one_freed():
    default, kept = faults("default"), faults("keep")
    # With glibc's defaults, blocks this size are mapped afresh (or the heap's top trimmed) pass after pass, and
    # each page is faulted in again: ~160k faults here, against ~8k kept.
    assert kept * 4 < default
