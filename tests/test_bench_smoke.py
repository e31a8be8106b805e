"""The benchmark still runs (at a tiny scale); its figures are read from its full run, not asserted here."""

from __future__ import annotations

import subprocess
import sys


def test_estimator_benchmark_runs_quick():
    result = subprocess.run([sys.executable, "-m", "bench.bench_estimator", "--quick"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for section in ("(a) Time to a correct top-10", "(b) Evaluations per second", "(c) Achieved FLOP/s", "(d) Defaults sweep"):
        assert section in result.stdout


def test_api_load_benchmark_runs_quick():
    result = subprocess.run([sys.executable, "-m", "bench.bench_api_load", "--quick"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for heading in ("full stack: PostgreSQL + Redis", "embedded default: SQLite", "req/s", "p50 (ms)", "p99 (ms)",
                    "errors"):
        assert heading in result.stdout


def test_publish_share_benchmark_runs_quick():
    result = subprocess.run([sys.executable, "-m", "bench.bench_publish_share", "--quick"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for heading in ("Time spent publishing", "share of job (%)", "ms/publication", "Cross-check", "minus off (s)",
                    "Target: publishing < 2%"):
        assert heading in result.stdout
