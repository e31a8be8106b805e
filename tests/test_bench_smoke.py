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
