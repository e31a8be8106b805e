"""``neuronshap estimate`` as pipelines call it: a separate process, JSON out, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

API_NEURON_KEYS = ["rank", "layer", "index", "value", "lower", "upper", "samples", "status"]


def neuronshap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuronshap", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_estimate_prints_ranked_neurons_as_json(tiny_cnn):
    result = neuronshap("estimate", tiny_cnn.onnx, tiny_cnn.npz, "--metric", "accuracy", "--top-k", "3",
                        "--max-iterations", "40", "--json")
    assert result.returncode == 0, result.stderr
    neurons = json.loads(result.stdout)
    assert len(neurons) == 10
    assert all(list(n) == API_NEURON_KEYS for n in neurons)
    assert [n["rank"] for n in neurons] == list(range(1, 11))
    values = [n["value"] for n in neurons]
    assert values == sorted(values, reverse=True)
    assert {n["layer"] for n in neurons} == {"conv1", "conv2"}
    assert all(n["lower"] <= n["value"] <= n["upper"] for n in neurons)
    assert {n["status"] for n in neurons} <= {"top", "out", "undecided"}
    assert "decided" in result.stderr  # the progress bar


def test_estimate_prints_a_table_for_people(tiny_cnn):
    result = neuronshap("estimate", tiny_cnn.pt2, tiny_cnn.npz, "--metric", "group_gap", "--groups", "0", "1",
                        "--mode", "bottom", "--top-k", "2", "--ablation", "mean", "--max-iterations", "20",
                        "--limit", "4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("metric group_gap:") and "ablation mean" in lines[0]
    assert lines[1].split()[:3] == ["rank", "layer", "index"]
    rows = lines[2:]
    assert len(rows) == 4
    values = [float(r.split()[3]) for r in rows]
    assert values == sorted(values)  # bottom mode lists the most harmful first


def test_user_errors_exit_2_with_one_line_and_no_traceback(tiny_cnn, tmp_path):
    cases = [
        ("estimate", tiny_cnn.onnx, tiny_cnn.npz, "--metric", "accuracy", "--layers", "nope*"),
        ("estimate", tiny_cnn.onnx, tiny_cnn.npz, "--metric", "class_recall"),
        ("estimate", tiny_cnn.onnx, tmp_path / "missing.npz", "--metric", "accuracy"),
        ("estimate", tiny_cnn.onnx, tiny_cnn.npz, "--metric", "accuracy", "--top-k", "99"),
    ]
    for args in cases:
        result = neuronshap(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith("neuronshap: error: ")
        assert result.stdout == ""
