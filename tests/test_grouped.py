"""Grouped evaluation (coalitions computed once per group sharing upstream masks) changes no value.

Checked against the plain suffix, which the exact-Shapley tests check in turn,
on the walks the estimator really makes, and on a model the grouping cannot
follow: that one must fall back to the plain suffix, not give wrong values.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from examples.digits import train
from tests.conftest import save, seeded
from worker.shapley import MetricSpec, NeuronGame, TMABConfig, load_data, load_model, run_tmab

WALKS = dict(mode="all", truncation=0.0, min_samples=10**9, lanes=3, coalitions_per_pass=24, max_iterations=6)


def games(saved, fmt: str, ablation: str = "zero") -> tuple[NeuronGame, NeuronGame]:
    model, data = load_model(saved.pt2 if fmt == "pt2" else saved.onnx), load_data(saved.npz)
    return tuple(NeuronGame(model, data, MetricSpec("log_likelihood"), ablation=ablation, batch_size=32,
                            grouped=grouped) for grouped in (True, False))


@pytest.mark.parametrize("fixture, fmt, ablation", [
    ("digits_cnn", "pt2", "zero"), ("digits_cnn", "onnx", "mean"), ("small_cnn", "onnx", "zero"),
    ("tiny_mlp", "pt2", "mean"),
])
def test_grouped_runs_give_the_plain_runs_values(request, fixture, fmt, ablation):
    grouped, plain = games(request.getfixturevalue(fixture), fmt, ablation)
    assert grouped.describe()["grouped_evaluation"] and not plain.describe()["grouped_evaluation"]
    a, b = (run_tmab(game, TMABConfig(**WALKS, seed=4)) for game in (grouped, plain))
    assert a.evaluations == b.evaluations > 0
    assert torch.allclose(a.values, b.values, atol=1e-6)
    assert torch.allclose(a.upper, b.upper, atol=1e-6)


class ConvolutionRows(TorchDispatchMode):
    """Counts the example rows that go through convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.conv2d, torch.ops.aten.convolution):
            self.rows += args[0].shape[0]
        return func(*args, **(kwargs or {}))


def test_coalitions_that_share_upstream_masks_are_computed_once(digits_cnn):
    """The saving is real: along a walk that removes later-layer neurons, the later convolutions run on fewer
    rows than one block per coalition, with the same values."""
    grouped, plain = games(digits_cnn, "pt2")
    sample = grouped.sample(torch.Generator().manual_seed(0), 1)
    first = grouped.layers[0].size
    masks = torch.ones(8, grouped.n_players, dtype=torch.bool)
    for step in range(1, 8):  # one more neuron of the second layer removed at each step
        masks[step:, first + step] = False
    lanes = torch.zeros(8, dtype=torch.long)
    rows = {}
    for game in (grouped, plain):
        with ConvolutionRows() as counter:
            values = game.evaluate(sample, masks, lanes)
        rows[game] = counter.rows
        assert torch.allclose(values, plain.evaluate(sample, masks, lanes), atol=1e-6)
    assert 0 < rows[grouped] < rows[plain]


class ReadsBatchBeforeAGate(nn.Module):
    """Reshapes the second layer's output with a batch size read from the first's: in ONNX a Shape op whose
    value the grouping cannot track (the two layers' tensors hold different numbers of groups)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        g = F.relu(self.conv2(h))
        return self.fc(g.reshape(h.shape[0], -1))


def test_a_model_the_grouping_cannot_follow_is_evaluated_plainly(digits, tmp_path):
    x_tr, y_tr, x_te, y_te = digits
    saved = save(train(seeded(ReadsBatchBeforeAGate), x_tr, y_tr, epochs=3), x_te[:64], y_te[:64], tmp_path, "early")
    grouped, plain = games(saved, "onnx")
    assert not grouped.describe()["grouped_evaluation"]
    a, b = (run_tmab(game, TMABConfig(**WALKS, seed=4)) for game in (grouped, plain))
    assert torch.equal(a.values, b.values)
