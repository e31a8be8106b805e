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
from tests.harness.models import save, seeded
from worker.shapley import MetricSpec, NeuronGame, TMABConfig, load_data, load_model, run_tmab
from worker.shapley.grouped import GroupedSuffix

WALKS = dict(mode="all", truncation=0.0, min_samples=10**9, lanes=3, coalitions_per_pass=24, max_iterations=6)


def games(saved, fmt: str, ablation: str = "zero") -> tuple[NeuronGame, NeuronGame]:
    model, data = load_model(saved.pt2 if fmt == "pt2" else saved.onnx), load_data(saved.npz)
    return tuple(
        NeuronGame(model, data, MetricSpec("log_likelihood"), ablation=ablation, batch_size=32, grouped=grouped)
        for grouped in (True, False)
    )


@pytest.mark.parametrize(
    "fixture, fmt, ablation",
    [
        ("digits_cnn", "pt2", "zero"),
        ("digits_cnn", "onnx", "mean"),
        ("small_cnn", "onnx", "zero"),
        ("tiny_mlp", "pt2", "mean"),
    ],
)
def test_grouped_runs_give_the_plain_runs_values(request, fixture, fmt, ablation):
    grouped, plain = games(request.getfixturevalue(fixture), fmt, ablation)
    assert grouped.describe()["grouped_evaluation"] and not plain.describe()["grouped_evaluation"]
    assert grouped.describe()["deferred_gates"]
    a, b = (run_tmab(game, TMABConfig(**WALKS, seed=4)) for game in (grouped, plain))
    assert a.evaluations == b.evaluations > 0
    assert torch.allclose(a.values, b.values, atol=1e-6)
    assert torch.allclose(a.upper, b.upper, atol=1e-6)


class Rows(TorchDispatchMode):
    """Counts the example rows that go through some ops."""

    def __init__(self, *ops) -> None:
        super().__init__()
        self.ops, self.rows = ops, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.ops:
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
        with Rows(torch.ops.aten.conv2d, torch.ops.aten.convolution) as counter:
            values = game.evaluate(sample, masks, lanes)
        rows[game] = counter.rows
        assert torch.allclose(values, plain.evaluate(sample, masks, lanes), atol=1e-6)
    assert 0 < rows[grouped] < rows[plain]


def test_a_deferred_gate_pools_once_per_upstream_group_and_reaches_the_linear_layer_as_a_product(digits_cnn):
    """Removing conv2 neurons one by one: deferred, conv2's max-pool runs on one block of rows for the eight
    coalitions instead of eight, and fc1 once, split by neuron, instead of once per coalition."""
    game, plain = games(digits_cnn, "pt2")
    sample = game.sample(torch.Generator().manual_seed(0), 1)
    first = game.layers[0].size
    masks = torch.ones(8, game.n_players)
    for step in range(1, 8):
        masks[step:, first + step] = 0
    lanes = torch.zeros(8, dtype=torch.long)
    expected = plain.model.run(sample.frontier, sample.lane_rows[lanes].reshape(-1), masks)
    pooled, linear = {}, {}
    for defer in (True, False):
        suffix = GroupedSuffix(game.model.suffix, defer=defer)
        with (
            Rows(torch.ops.aten.max_pool2d_with_indices, torch.ops.aten.max_pool2d) as pool,
            Rows(torch.ops.aten.linear, torch.ops.aten.addmm) as dense,
        ):
            got = suffix.evaluate(sample.frontier, sample.lane_rows, lanes, masks)
        pooled[defer], linear[defer] = pool.rows, dense.rows
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    b = game.batch_size
    assert pooled[False] == 8 * b and pooled[True] == b + 2  # + the fill and the neuron map
    # Undeferred, fc1 and fc2 run on eight blocks each; deferred, fc2 still does, but fc1 runs split by neuron
    # (a bmm, not counted here) and then as products of masks, under one block of rows in all.
    assert linear[False] == 16 * b and linear[True] < 9 * b


@pytest.mark.parametrize("fmt, ablation", [("pt2", "zero"), ("onnx", "mean")])
def test_a_star_of_first_layer_flips_runs_the_next_convolution_once_per_batch(digits_cnn, fmt, ablation):
    """A star round's coalitions (one random coalition, and it with each of six conv1 channels flipped) on two
    batches: conv2 runs once per batch at a base mask, each flip added as one channel's convolution (a matrix
    product, not counted here), with the values of one conv2 per coalition."""
    game, plain = games(digits_cnn, fmt, ablation)
    generator = torch.Generator().manual_seed(0)
    sample = game.sample(generator, 2)
    stars = []
    for _ in range(2):
        star = (torch.rand(game.n_players, generator=generator) < 0.5).float().expand(7, -1).clone()
        for k in range(1, 7):
            star[k, k] = 1 - star[k, k]
        stars.append(star)
    masks, lanes = torch.cat(stars), torch.arange(2).repeat_interleave(7)
    expected = plain.model.run(sample.frontier, sample.lane_rows[lanes].reshape(-1), masks)
    rows = {}
    for defer in (True, False):
        suffix = GroupedSuffix(game.model.suffix, defer=defer)
        with Rows(torch.ops.aten.conv2d, torch.ops.aten.convolution) as conv:
            got = suffix.evaluate(sample.frontier, sample.lane_rows, lanes, masks)
        rows[defer] = conv.rows
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert rows[False] == 14 * game.batch_size and rows[True] == 2 * game.batch_size


class StridedDilatedConv(nn.Module):
    """A second convolution with stride, dilation and padding, whose split (patches × weights) must follow all
    three: the load-time check forces the split and falls back to undeferred where it differs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        return self.fc(F.relu(self.conv2(h)).flatten(1))


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_a_split_convolution_follows_stride_dilation_and_padding(digits, tmp_path, fmt):
    x_tr, y_tr, x_te, y_te = digits
    saved = save(train(seeded(StridedDilatedConv), x_tr, y_tr, epochs=3), x_te[:64], y_te[:64], tmp_path, "sd")
    game, plain = games(saved, fmt, "mean")
    assert game.describe()["deferred_gates"]
    sample = game.sample(torch.Generator().manual_seed(0), 1)
    star = (torch.rand(game.n_players, generator=torch.Generator().manual_seed(1)) < 0.5).float().expand(5, -1).clone()
    for k in range(1, 5):
        star[k, k - 1] = 1 - star[k, k - 1]  # each conv1 channel flipped in turn
    lanes = torch.zeros(5, dtype=torch.long)
    with Rows(torch.ops.aten.conv2d, torch.ops.aten.convolution) as conv:
        got = game.evaluate(sample, star, lanes)
    assert torch.allclose(got, plain.evaluate(sample, star, lanes), atol=1e-6)
    assert conv.rows == game.batch_size  # conv2 once, at the base; the four flips as products


class TwoConvs(nn.Module):
    """Two small convolutions and a linear head, for models whose forward defeats one evaluation path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.fc = nn.Linear(6 * 4 * 4, 10)


class MeanOverNeurons(TwoConvs):
    """Centres the first layer's channels on their mean: a ``mean`` that mixes neurons, which deferring a gate
    past it would get wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h - h.mean(1, keepdim=True)))
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_a_model_that_mixes_neurons_is_evaluated_without_deferring(digits, tmp_path, fmt):
    x_tr, y_tr, x_te, y_te = digits
    saved = save(train(seeded(MeanOverNeurons), x_tr, y_tr, epochs=3), x_te[:64], y_te[:64], tmp_path, "mix")
    grouped, plain = games(saved, fmt)
    assert grouped.describe()["grouped_evaluation"] and not grouped.describe()["deferred_gates"]
    a, b = (run_tmab(game, TMABConfig(**WALKS, seed=4)) for game in (grouped, plain))
    assert torch.allclose(a.values, b.values, atol=1e-6)


class ReadsBatchBeforeAGate(TwoConvs):
    """Reshapes the second layer's output with a batch size read from the first's: in ONNX a Shape op whose
    value the grouping cannot track (the two layers' tensors hold different numbers of groups)."""

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
