"""``neuronshap estimate`` as pipelines call it: a separate process, JSON out, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from neuronshap import __version__

API_NEURON_KEYS = ["rank", "layer", "index", "value", "lower", "upper", "samples", "status"]


def neuronshap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "neuronshap", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_estimate_prints_ranked_neurons_as_json(tiny_cnn):
    result = neuronshap(
        "estimate",
        tiny_cnn.onnx,
        tiny_cnn.npz,
        "--metric",
        "accuracy",
        "--top-k",
        "3",
        "--max-iterations",
        "40",
        "--json",
    )
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
    result = neuronshap(
        "estimate",
        tiny_cnn.pt2,
        tiny_cnn.npz,
        "--metric",
        "group_gap",
        "--groups",
        "0",
        "1",
        "--mode",
        "bottom",
        "--top-k",
        "2",
        "--ablation",
        "mean",
        "--max-iterations",
        "20",
        "--limit",
        "4",
    )
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


def refused_before_torch(*args: object) -> tuple[int, str, bool]:
    """Run ``neuronshap`` in a fresh interpreter; (exit status, stderr, whether torch was imported by then)."""
    probe = (
        "import contextlib, io, json, sys\n"
        "from neuronshap.cli import main\n"
        "err = io.StringIO()\n"
        "with contextlib.redirect_stderr(err):\n"
        "    try:\n"
        "        rc = main(sys.argv[1:])\n"
        "    except SystemExit as exc:\n"
        "        rc = exc.code\n"
        "print(json.dumps([rc, err.getvalue(), 'torch' in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rc, stderr, torch_loaded = json.loads(done.stdout)
    return rc, stderr, torch_loaded


@pytest.mark.parametrize(
    "args, says",
    [
        (("--metric", "nope"), "invalid choice: 'nope'"),
        (("--metric", "class_recall"), "--metric: metric class_recall needs --class"),
        (("--metric", "accuracy", "--delta", "2"), "--delta:"),
        (("--metric", "accuracy", "--top-k", "0"), "--top-k:"),
        (("--metric", "accuracy", "--batch-size", "0"), "--batch-size:"),
    ],
)
def test_option_errors_answer_before_torch_loads_naming_the_option(tmp_path, args, says):
    """A bad option costs the interpreter's start, not the estimator's import (seconds on a loaded machine)."""
    model, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    model.write_bytes(b"\x08\x07")
    data.write_bytes(b"")
    rc, stderr, torch_loaded = refused_before_torch("estimate", model, data, *args)
    assert rc == 2 and says in stderr, stderr
    assert not torch_loaded, "the check waited for the estimator to load"
    assert "Traceback" not in stderr


def test_file_errors_answer_before_torch_loads_naming_the_file(tmp_path, tiny_cnn):
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_text("hello")
    missing = refused_before_torch("estimate", tmp_path / "missing.onnx", tiny_cnn.npz, "--metric", "accuracy")
    wrong = refused_before_torch("estimate", not_onnx, tiny_cnn.npz, "--metric", "accuracy")
    assert missing[0] == 2 and "missing.onnx: no such file" in missing[1] and not missing[2]
    assert wrong[0] == 2 and "model file" in wrong[1] and "not an ONNX model" in wrong[1] and not wrong[2]


def test_version():
    result = neuronshap("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"neuronshap {__version__}"


def test_a_small_layer_choice_without_top_k_ranks_what_there_is(tiny_cnn):
    """conv1 has 4 channels: the default top_k (10) becomes 3 rather than an error about a value never set."""
    result = neuronshap(
        "estimate",
        tiny_cnn.onnx,
        tiny_cnn.npz,
        "--metric",
        "accuracy",
        "--layers",
        "conv1",
        "--max-iterations",
        "8",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == 4
