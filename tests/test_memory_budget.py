"""The activation memory budget: it sets coalitions per pass, and a model that cannot fit one coalition is refused.

``NeuronGame(memory_bytes=...)`` is ``NEURONSHAP_ACTIVATION_MEMORY_MB`` (the worker) and
``neuronshap estimate --activation-memory-mb`` (the CLI); ``bench/bench_zoo.py`` prints the estimate of a pass
beside its measured peak RSS on the zoo networks.
"""

from __future__ import annotations

import os
import subprocess
import sys

import onnx
import pytest
import torch
from torch import nn

from examples.digits import export_onnx, save_eval_npz
from tests.harness.models import seeded
from worker.shapley import MetricSpec, NeuronGame, load_model
from worker.shapley.data import EvalData
from worker.shapley.errors import ModelError


class WideConv(nn.Module):
    """32 channels at 32x32: 128 KiB per example for each activation, so a batch of 64 needs several MiB."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    module = seeded(WideConv).eval()
    x = torch.randn(64, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = module(x).argmax(1)
    directory = tmp_path_factory.mktemp("wide")
    export_onnx(module, directory / "wide.onnx", x[:2])
    save_eval_npz(directory / "wide.npz", x, y)
    return directory / "wide.onnx", directory / "wide.npz", EvalData(x, y)


def game(wide, memory_bytes: int, batch_size: int = 64) -> NeuronGame:
    return NeuronGame(
        load_model(wide[0]), wide[2], MetricSpec("accuracy"), batch_size=batch_size, memory_bytes=memory_bytes
    )


def test_the_budget_sets_coalitions_per_pass(wide):
    one = game(wide, 512 << 20)
    needed = one.bytes_per_row * one.batch_size  # one coalition on one batch
    # the live activations of a row: at least the two 32x32x32 float tensors a conv reads and writes
    assert one.bytes_per_row >= 2 * 32 * 32 * 32 * 4
    sizes = {}
    for coalitions in (1, 3, 12):
        budget = -(-coalitions * needed * 4 // 3)  # a quarter of the budget is kept for grouped linear layers
        sizes[coalitions] = game(wide, budget).max_coalitions_per_pass
    assert sizes == {1: 1, 3: 3, 12: 12}
    assert game(wide, 512 << 20, batch_size=16).max_coalitions_per_pass >= 4 * one.max_coalitions_per_pass


def test_a_model_that_cannot_fit_one_coalition_is_refused_saying_what_it_needs(wide):
    with pytest.raises(ModelError) as refused:
        game(wide, 1 << 20)
    message = str(refused.value)
    assert "needs about" in message and "MiB" in message and "batch of 64 examples" in message
    assert "NEURONSHAP_ACTIVATION_MEMORY_MB" in message and "--activation-memory-mb" in message
    assert "--batch-size" in message
    # the budget it names is enough
    least = int(message.split("to at least ")[1].split(",")[0])
    assert game(wide, least << 20).max_coalitions_per_pass == 1


def test_the_cli_takes_the_budget_and_refuses_with_exit_2(wide):
    result = subprocess.run(
        [sys.executable, "-m", "neuronshap", "estimate", str(wide[0]), str(wide[1]), "--metric", "accuracy"]
        + ["--activation-memory-mb", "1", "--max-iterations", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "neuronshap: error: One coalition of this model" in result.stderr
    assert "Traceback" not in result.stderr


def with_lrn_after_first_relu(source, target) -> None:
    """The ONNX file with an LRN node after its first Relu (torch's exporter writes local_response_norm as an If)."""
    model = onnx.load(source)
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    after, relu.output[0] = relu.output[0], relu.output[0] + "_before_lrn"
    lrn = onnx.helper.make_node("LRN", [relu.output[0]], [after], size=5, alpha=1e-4, beta=0.75, bias=1.0)
    model.graph.node.insert(list(model.graph.node).index(relu) + 1, lrn)
    onnx.save(model, target)


def test_a_node_that_makes_temporaries_counts_them(wide, tmp_path):
    """An LRN's peak is about 4.1x its output (its output, the squares, their padded copy, the window sums and
    the power, measured with ru_maxrss on ZFNet-512's first LRN): the estimate must cover it, not the output alone
    (ZFNet-512's pass once measured 1.8x its estimate)."""
    with_lrn_after_first_relu(wide[0], tmp_path / "lrn.onnx")
    lrn = NeuronGame(load_model(tmp_path / "lrn.onnx"), wide[2], MetricSpec("accuracy"), memory_bytes=512 << 20)
    output = 32 * 32 * 32 * 4  # the LRN's output per example
    assert lrn.bytes_per_row >= 4.1 * output * 2.5
    assert lrn.bytes_per_row > game(wide, 512 << 20).bytes_per_row + 3 * output


def test_the_default_budget_is_half_the_devices_memory(monkeypatch):
    """Half the RAM on the CPU; half the GPU's own memory on a GPU (a fixed 8 GiB let ResNet-50 at 224 px fit about
    3 coalitions a pass on a 139 GiB device). No GPU here: the device's reported size stands in for one."""
    from types import SimpleNamespace

    from worker.shapley.game import default_memory_bytes

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert default_memory_bytes(torch.device("cpu")) == max(1 << 30, ram // 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=140 << 30))
    assert default_memory_bytes(torch.device("cuda", 0)) == 70 << 30
