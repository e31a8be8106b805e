"""The handoff to Torch-Pruning: an edit's pruning plan, replayed by ``torch-pruning`` on the job's PyTorch model.

Under the ``zero`` policy, removing a channel as the game does (its output set
to 0 after the BatchNorm/activation chain) and pruning it structurally (the
filter, its BatchNorm channel and the next layer's input weights deleted) give
the same network wherever everything between the gate and the next layer maps
an all-zero channel to an all-zero channel, channel by channel (ReLU, pooling,
flatten): the next layer then adds ``W[:, c] · 0`` for the channel, which is
what pruning deletes. So the pruned model's accuracy is the edit's ``after``,
overall and per group. Where that does not hold (a BatchNorm or bias after
the gate point outside the chain, a normalisation across channels, channels
coupled by a residual add, the ``mean`` policy) the two differ, and the plan
is a ranking to prune by rather than the same network.
"""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from app.jobs.schemas import PruningPlan
from worker.shapley import MetricSpec, NeuronGame, load_data, load_model
from worker.shapley.data import EvalData
from worker.shapley.editing import run_edit


def ranked_by_leave_one_out(path, data: EvalData) -> list[dict]:
    """The job's ranked neurons, valued by what removing each alone costs in log-likelihood (a real ranking,
    cheap to compute, and without ties)."""
    game = NeuronGame(load_model(path), data, MetricSpec("log_likelihood"), batch_size=10**6)
    masks = torch.ones(game.n_players + 1, game.n_players, dtype=torch.bool)
    masks[1:].fill_diagonal_(False)
    v = game.full_values(masks)
    values = v[0] - v[1:]
    names = game.player_names()
    order = torch.argsort(values, descending=True, stable=True).tolist()
    return [
        {"rank": r, "layer": names[i][0], "index": names[i][1], "value": float(values[i]), "lower": -1.0, "upper": 1.0}
        for r, i in enumerate(order, start=1)
    ]


def figures(model: nn.Module, data: EvalData) -> dict:
    """Accuracy and each group's accuracy, as an edit reports them."""
    with torch.no_grad():
        correct = model(data.inputs).argmax(-1) == data.labels
    assert data.groups is not None
    return {
        "after": float(correct.double().mean()),
        "groups": {
            str(g): float(correct[data.groups == g].double().mean()) for g in torch.unique(data.groups).tolist()
        },
    }


def test_a_pruning_plan_replayed_by_torch_pruning_gives_the_edits_figures(tiny_cnn):
    data = load_data(tiny_cnn.npz)
    game = NeuronGame(load_model(tiny_cnn.pt2), data, MetricSpec("accuracy"), batch_size=10**6)
    selection = {
        "neurons": [{"layer": "conv1", "index": 1}, {"layer": "conv1", "index": 3}, {"layer": "conv2", "index": 0}]
    }
    edit = run_edit(game, ranked_by_leave_one_out(tiny_cnn.pt2, data), selection, data)
    plan = PruningPlan.from_removed(edit["removed"])
    assert plan.layers == {"conv1": [1, 3], "conv2": [0]}

    model = copy.deepcopy(tiny_cnn.module).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=data.inputs[:2])
    for layer, indices in plan.layers.items():
        module = model.get_submodule(layer)
        prune = tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels
        graph.get_pruning_group(module, prune, idxs=indices).prune()
    # conv1's BatchNorm and conv2's inputs went with conv1's channels; the classifier's inputs with conv2's
    assert (model.conv1.out_channels, model.bn1.num_features, model.conv2.in_channels) == (2, 2, 2)
    assert (model.conv2.out_channels, model.fc.in_features) == (5, 5 * 16)
    assert torch.equal(model.conv1.weight, tiny_cnn.module.conv1.weight[[0, 2]])

    job = edit["metrics"]["job_data"]
    assert job["after"] < job["before"]  # the channels matter, so a wrong replay would show
    assert figures(model, data) == {"after": job["after"], "groups": {g: v["after"] for g, v in job["groups"].items()}}


class ShapleyImportance(tp.importance.Importance):
    """A Torch-Pruning criterion that reads a job's per-layer values (``GET /v1/jobs/{id}/importance``)."""

    def __init__(self, model: nn.Module, layers: dict[str, dict[str, list[float]]]) -> None:
        self.names = {module: name for name, module in model.named_modules()}
        self.layers = layers

    def __call__(self, group) -> torch.Tensor:
        root = group[0]
        values = torch.tensor(self.layers[self.names[root.dep.target.module]]["value"])
        return values[root.idxs]


def test_meta_pruner_with_the_jobs_values_prunes_what_a_bottom_edit_removes(tiny_cnn):
    data = load_data(tiny_cnn.npz)
    game = NeuronGame(load_model(tiny_cnn.pt2), data, MetricSpec("accuracy"), batch_size=10**6)
    neurons = ranked_by_leave_one_out(tiny_cnn.pt2, data)
    layers: dict[str, dict[str, list[float]]] = {}
    for n in sorted(neurons, key=lambda n: (n["layer"], n["index"])):
        layers.setdefault(n["layer"], {"value": []})["value"].append(n["value"])
    model = copy.deepcopy(tiny_cnn.module).eval()
    pruner = tp.pruner.MetaPruner(
        model,
        data.inputs[:2],
        importance=ShapleyImportance(model, layers),
        pruning_ratio=0.0,
        pruning_ratio_dict={model.conv2: 0.5},
        ignored_layers=[model.conv1, model.fc],
    )
    pruner.step()
    lowest = [n for n in neurons[::-1] if n["layer"] == "conv2"][:3]
    kept = sorted(set(range(6)) - {n["index"] for n in lowest})
    assert torch.equal(model.conv2.weight, tiny_cnn.module.conv2.weight[kept])  # the three lowest-valued went
    edit = run_edit(game, neurons, {"neurons": [{"layer": "conv2", "index": n["index"]} for n in lowest]}, data)
    job = edit["metrics"]["job_data"]
    assert figures(model, data) == {"after": job["after"], "groups": {g: v["after"] for g, v in job["groups"].items()}}
