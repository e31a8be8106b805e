"""The ablation check's curves, the smallest-weight-norm baseline among them, on real networks."""

from __future__ import annotations

import torch

from worker.shapley import MetricSpec, NeuronGame, ablation_curve, load_data, load_model
from worker.shapley.ablation import relative_weight_norms, weight_norms


def l1(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().flatten(1).abs().sum(1).double()


def test_weight_norms_are_the_l1_norms_of_each_filter_and_weight_row(tiny_cnn, tiny_mlp):
    m = tiny_cnn.module
    data = load_data(tiny_cnn.npz)
    pt2 = NeuronGame(load_model(tiny_cnn.pt2), data, MetricSpec("accuracy"))
    assert torch.allclose(weight_norms(pt2), torch.cat([l1(m.conv1.weight), l1(m.conv2.weight)]))
    # The ONNX exporter folds bn1 into conv1: the game runs (and the norm reads) the folded filter.
    onnx_game = NeuronGame(load_model(tiny_cnn.onnx), data, MetricSpec("accuracy"))
    scale = (m.bn1.weight / (m.bn1.running_var + m.bn1.eps).sqrt()).detach().abs().double()
    assert torch.allclose(weight_norms(onnx_game), torch.cat([l1(m.conv1.weight) * scale, l1(m.conv2.weight)]))
    mlp = tiny_mlp.module
    game = NeuronGame(load_model(tiny_mlp.pt2), load_data(tiny_mlp.npz), MetricSpec("accuracy"))
    assert torch.allclose(weight_norms(game), torch.cat([l1(mlp.fc1.weight), l1(mlp.fc2.weight)]))


def test_the_weight_norm_curve_removes_the_smallest_norms_relative_to_their_layer_first(tiny_cnn):
    game = NeuronGame(load_model(tiny_cnn.pt2), load_data(tiny_cnn.npz), MetricSpec("accuracy"), batch_size=10**6)
    values = torch.linspace(1, -1, game.n_players)  # any ranking: the baseline does not read it
    curve = ablation_curve(game, values, k=4)
    norms = relative_weight_norms(game)
    raw = weight_norms(game)
    for layer in game.layers:  # each layer's L1 norms over their mean: a first layer's few weights do not sink it
        block = slice(layer.offset, layer.offset + layer.size)
        assert torch.allclose(norms[block], raw[block] / raw[block].mean())
    smallest = torch.argsort(norms)[:4].tolist()
    names = game.player_names()
    assert curve["removed_weight_norm"] == [{"layer": names[i][0], "index": names[i][1]} for i in smallest]
    masks = torch.ones(5, game.n_players, dtype=torch.bool)
    for j in range(1, 5):
        masks[j, smallest[:j]] = False
    assert curve["weight_norm"] == game.full_values(masks).tolist()
    assert curve["weight_norm"][0] == curve["top"][0] == curve["bottom"][0]  # nothing removed: the intact model
    assert curve["removed_top"][0] == {"layer": "conv1", "index": 0}  # the ranking given, not the norms
