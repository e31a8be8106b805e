"""The benchmark still runs (at a tiny scale); its figures are read from its full run, not asserted here.

Each run is part of this test run (``NEURONSHAP_TEST_RUN``): its Redis queue and keys are in this run's namespace.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.harness.services import RUN_ENV, RUN_ID

pytestmark = [pytest.mark.bench, pytest.mark.slow]
SERVICE = pytest.mark.service  # PostgreSQL and Redis (and, for two of them, a worker and a served API)


@pytest.mark.parametrize(
    "module, headings, timeout",
    [
        (
            "bench.bench_estimator",
            ("(a) Time to a correct top-10", "(b) Evaluations per second", "(c) Achieved FLOP/s", "(d) Defaults sweep"),
            600,
        ),
        (  # SqueezeNet and ShuffleNet from the onnx wheel, 16 examples, 2 s each; exits 1 if a network fails
            "bench.bench_zoo",
            ("load average at the start", "torch threads per network", "build s", "evals/s", "per pass")
            + ("pass est MiB", "peak RSS MiB", "loads as shipped", "squeezenet", "shufflenet"),
            300,
        ),
        (
            "bench.bench_contention",
            ("Contention benchmark", "alone evals/s", "busy evals/s", "alone / busy", "OMP_WAIT_POLICY"),
            300,
        ),
        (
            "bench.bench_engine",
            ("Evaluations per second: engine", "engine / plain", "engine / onnxruntime", "Profile of one engine pass"),
            300,
        ),
        (  # SqueezeNet at 32 px: a certified top-10 under a 15 s cap, then the GPU section's code on the CPU
            "bench.bench_scale",
            ("CPU scale: certified top-10", "evaluations/s", "rounds:", "decided:", "stop reason:", "GPU section")
            + ("bf16 matmul peak", "% of bf16 peak", "Time to a certified top-100", "load average at the end"),
            300,
        ),
        pytest.param(
            "bench.bench_api_load",
            ("full stack: PostgreSQL + Redis", "embedded default: SQLite", "req/s", "p50 (ms)", "p99 (ms)", "errors"),
            300,
            marks=SERVICE,
        ),
        pytest.param(
            "bench.bench_publish_share",
            (
                "Time spent publishing",
                "share of job (%)",
                "ms/publication",
                "Cross-check",
                "minus off (s)",
                "Target: publishing < 2%",
            ),
            300,
            marks=SERVICE,
        ),
        # Exits 1 on any violation: at this scale too, every job must end once, stored once, nothing stuck.
        pytest.param(
            "bench.bench_job_load",
            (
                "Figures",
                "submit p99 (ms)",
                "to end p99 (s)",
                "Checks",
                "every job ended once, in the state it must; results stored once; nothing stuck",
            ),
            300,
            marks=SERVICE,
        ),
    ],
)
def test_benchmark_runs_quick(module: str, headings: tuple[str, ...], timeout: int):
    result = subprocess.run(
        [sys.executable, "-m", module, "--quick"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | {RUN_ENV: RUN_ID},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for heading in headings:
        assert heading in result.stdout
