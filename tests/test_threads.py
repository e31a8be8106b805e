"""A job process takes its torch thread count from ``NEURONSHAP_THREADS``, else from the cores it is given.

The default is checked in fresh processes (torch fixes its inter-op pool once per process) whose CPU affinity
is set as ``taskset`` or a container's cpuset would; the setting is checked where jobs run: a job's summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.harness import stacks
from tests.harness.jobs import QUICK, submit
from worker.threads import allowed_cores, default_threads

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import dataclasses, json, torch\n"
    "from app.core.config import get_settings\n"
    "from worker.process import prepare_process\n"
    "t = prepare_process(get_settings().threads)\n"
    "torch_threads = [torch.get_num_threads(), torch.get_num_interop_threads()]\n"
    "print(json.dumps({'threads': dataclasses.asdict(t), 'torch': torch_threads}))\n"
)
CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def probe(cpus: list[int], **env: str) -> dict:
    """What a fresh process pinned to ``cpus`` runs with."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "NEURONSHAP_THREADS"} | env,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_the_default_leaves_a_core_to_the_neighbours():
    assert [default_threads(c) for c in (1, 2, 3, 16)] == [1, 1, 2, 15]


def test_a_cgroup_cpu_quota_caps_the_cores(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    affinity = allowed_cores(tmp_path / "absent")
    cpu_max.write_text("max 100000\n")
    assert allowed_cores(cpu_max) == affinity
    cpu_max.write_text("50000 100000\n")  # half a core: one
    assert allowed_cores(cpu_max) == 1
    cpu_max.write_text(f"{100000 * (affinity + 4)} 100000\n")  # more than the affinity allows: the affinity
    assert allowed_cores(cpu_max) == affinity


@pytest.mark.skipif(not CPUS, reason="no CPU affinity on this platform")
def test_the_default_follows_the_cpu_affinity():
    one = probe(CPUS[:1])
    assert one["threads"] == {"intra_op": 1, "interop": 1, "cores": 1, "source": "default"}
    assert one["torch"] == [1, 1]
    if len(CPUS) >= 3:
        assert probe(CPUS[:3])["torch"] == [2, 2]


@pytest.mark.skipif(not CPUS, reason="no CPU affinity on this platform")
def test_the_setting_overrides_the_default():
    got = probe(CPUS[:1], NEURONSHAP_THREADS="3")
    assert got["threads"] == {"intra_op": 3, "interop": 3, "cores": 1, "source": "NEURONSHAP_THREADS"}
    assert got["torch"] == [3, 3]


def test_a_job_runs_on_the_threads_of_its_setting_and_says_so(tmp_path, tiny_cnn):
    threads = torch.get_num_threads()
    try:
        with stacks.embedded(tmp_path, threads=3) as stack:
            job = submit(stack.client, tiny_cnn, QUICK)
            done = stack.wait(job["id"], ("succeeded", "failed"))
    finally:
        torch.set_num_threads(threads)  # the embedded queue ran in this process
    assert done["state"] == "succeeded", done
    summary = done["summary"]["threads"]
    assert summary["intra_op"] == 3 and summary["source"] == "NEURONSHAP_THREADS"
    assert summary["cores"] == allowed_cores()


def test_the_command_takes_threads_and_refuses_nonsense(tiny_cnn):
    def estimate(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "neuronshap", "estimate", tiny_cnn.onnx, tiny_cnn.npz, "--metric", "accuracy"]
            + ["--top-k", "3", "--max-iterations", "8", "--json", *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )

    refused = estimate("--threads", "0")
    assert refused.returncode == 2 and "--threads" in refused.stderr and "Traceback" not in refused.stderr
    ran = estimate("--threads", "1")
    assert ran.returncode == 0, ran.stderr
    assert len(json.loads(ran.stdout)) == 10
