"""Edits: selections resolved against a job's ranked neurons, before/after figures, and the edited ONNX file.

The edited file is checked against onnxruntime: run on the job's data, it gives
exactly the predictions (so the metric and every group's accuracy) that the edit
reports, for both ablation policies, on a network with BatchNorm, exported to
ONNX and to ``.pt2``, and on a hand-written graph in the ONNX Model Zoo's
style (opset 9, IR 3, Caffe2 weight names, batch fixed at 1, Dropout, a
MatMul whose bias Add the importer folds).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from worker.shapley import MetricSpec, NeuronGame, load_data, load_model
from worker.shapley.data import EvalData
from worker.shapley.editing import EditError, resolve_selection, run_edit
from worker.shapley.onnx_export import edited_onnx


def ranked(game: NeuronGame, values: torch.Tensor, half_width: float | torch.Tensor = 0.01) -> list[dict]:
    """The job's ranked neurons as the service stores them, for given values and bounds."""
    names = game.player_names()
    lower, upper = values - half_width, values + half_width
    order = torch.argsort(values, descending=True, stable=True).tolist()
    return [
        {
            "rank": r,
            "layer": names[i][0],
            "index": names[i][1],
            "value": float(values[i]),
            "lower": float(lower[i]),
            "upper": float(upper[i]),
            "samples": 10,
            "status": "decided",
        }
        for r, i in enumerate(order, start=1)
    ]


def game_of(path, data: EvalData, ablation: str = "zero", metric: MetricSpec | None = None) -> NeuronGame:
    return NeuronGame(load_model(path), data, metric or MetricSpec("accuracy"), ablation=ablation, batch_size=10**6)


def leave_one_out(game: NeuronGame) -> torch.Tensor:
    """What removing each neuron alone costs: a real ranking of the network's neurons, cheap to compute."""
    masks = torch.ones(game.n_players + 1, game.n_players, dtype=torch.bool)
    masks[1:].fill_diagonal_(False)
    v = game.full_values(masks)
    return v[0] - v[1:]


@pytest.fixture(scope="module")
def cnn(tiny_cnn):
    """The tiny CNN's data, its games (by format and policy, each built once) and a ranking of its 10 neurons."""
    data = load_data(tiny_cnn.npz)
    games: dict[tuple[str, str], NeuronGame] = {}

    def game(fmt: str = "pt2", ablation: str = "zero") -> NeuronGame:
        if (fmt, ablation) not in games:
            games[fmt, ablation] = game_of(tiny_cnn.pt2 if fmt == "pt2" else tiny_cnn.onnx, data, ablation)
        return games[fmt, ablation]

    return data, game, leave_one_out(game())


def onnx_predictions(model: bytes, inputs: np.ndarray, one_at_a_time: bool = False) -> np.ndarray:
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    if one_at_a_time:  # a file that fixes the batch at 1
        scores = np.concatenate([session.run(None, {name: inputs[i : i + 1]})[0] for i in range(len(inputs))])
    else:
        scores = session.run(None, {name: inputs})[0]
    return scores.reshape(len(inputs), -1).argmax(-1)


def assert_reproduces(edit: dict, predictions: np.ndarray, data: EvalData) -> None:
    """onnxruntime's predictions give the edit's `after`, overall and per group."""
    labels = data.labels.numpy()
    correct = predictions == labels
    after = edit["metrics"]["job_data"]
    assert float(correct.mean()) == after["after"]
    groups = data.groups.numpy()
    assert {g: float(correct[groups == int(g)].mean()) for g in after["groups"]} == {
        g: v["after"] for g, v in after["groups"].items()
    }


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_the_edited_onnx_file_gives_the_edits_after_on_a_model_with_batchnorm(tiny_cnn, cnn, ablation):
    data, games, values = cnn
    game = games("onnx", ablation)
    assert game.layers[0].name == "conv1"  # followed by BatchNorm (folded into the conv by the exporter) and ReLU
    neurons = ranked(game, values)
    edit = run_edit(game, neurons, {"neurons": [{"layer": "conv1", "index": 1}, *edit_top(neurons, 3)]}, data)
    assert edit["metrics"]["job_data"]["after"] < edit["metrics"]["job_data"]["before"]  # the edit does something
    model = edited_onnx(tiny_cnn.onnx, game, edit["removed"])
    predictions = onnx_predictions(model, data.inputs.numpy())
    assert_reproduces(edit, predictions, data)
    original = onnx_predictions(tiny_cnn.onnx.read_bytes(), data.inputs.numpy())
    assert (predictions != original).any()
    edited, upload = onnx.load_from_string(model), onnx.load(str(tiny_cnn.onnx))
    assert [(i.name, i.type) for i in edited.graph.input] == [(i.name, i.type) for i in upload.graph.input]
    assert [(o.name, o.type) for o in edited.graph.output] == [(o.name, o.type) for o in upload.graph.output]


def edit_top(neurons: list[dict], k: int) -> list[dict]:
    return [{"layer": n["layer"], "index": n["index"]} for n in neurons[:k] if (n["layer"], n["index"]) != ("conv1", 1)]


@pytest.mark.slow
@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_a_pt2_upload_is_exported_to_onnx_with_the_same_removal(tiny_cnn, cnn, ablation):
    data, games, values = cnn
    game = games("pt2", ablation)
    edit = run_edit(game, ranked(game, values), {"top": 3}, data)
    model = edited_onnx(tiny_cnn.pt2, game, edit["removed"])
    assert_reproduces(edit, onnx_predictions(model, data.inputs.numpy()), data)
    assert [i.name for i in onnx.load_from_string(model).graph.input] == ["x"]


def zoo_style_graph(rng: np.random.Generator) -> onnx.ModelProto:
    """An opset-9, IR-3 graph written the way the Model Zoo's Caffe2 exports are.

    conv1 → BatchNormalization → Relu → Dropout → conv2 → Relu → MaxPool → Reshape([1, -1]) → MatMul + Add (fc1)
    → Gemm (fc2). Weights are seeded random.
    """

    def weight(name: str, *shape: int, scale: float = 0.5) -> TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        weight("conv1_w_0", 6, 1, 3, 3),
        weight("conv1_b_0", 6, scale=0.1),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 6).astype(np.float32), "bn1_s_0"),
        weight("bn1_b_0", 6, scale=0.3),
        weight("bn1_rm_0", 6, scale=0.2),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 6).astype(np.float32), "bn1_riv_0"),
        weight("conv2_w_0", 8, 6, 3, 3, scale=0.3),
        weight("conv2_b_0", 8, scale=0.1),
        numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "flat_shape"),
        weight("fc1_w_0", 8 * 4 * 4, 12, scale=0.2),
        weight("fc1_b_0", 12, scale=0.1),
        weight("fc2_w_0", 10, 12),
        weight("fc2_b_0", 10, scale=0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["data_0", "conv1_w_0", "conv1_b_0"], ["conv1_1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv1_1", "bn1_s_0", "bn1_b_0", "bn1_rm_0", "bn1_riv_0"], ["bn1_1"]),
        helper.make_node("Relu", ["bn1_1"], ["relu1_1"]),
        helper.make_node("Dropout", ["relu1_1"], ["drop1_1"], ratio=0.5),
        helper.make_node("Conv", ["drop1_1", "conv2_w_0", "conv2_b_0"], ["conv2_1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv2_1"], ["relu2_1"]),
        helper.make_node("MaxPool", ["relu2_1"], ["pool2_1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["pool2_1", "flat_shape"], ["flat_1"]),
        helper.make_node("MatMul", ["flat_1", "fc1_w_0"], ["fc1_mm"]),
        helper.make_node("Add", ["fc1_mm", "fc1_b_0"], ["fc1_1"]),
        helper.make_node("Gemm", ["fc1_1", "fc2_w_0", "fc2_b_0"], ["fc2_1"], transB=1),
    ]
    inputs = [helper.make_tensor_value_info("data_0", TensorProto.FLOAT, [1, 1, 8, 8])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]  # IR 3 lists them
    graph = helper.make_graph(
        nodes, "zoo_style", inputs, [helper.make_tensor_value_info("fc2_1", TensorProto.FLOAT, [1, 10])], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    return model


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_a_zoo_style_graph_is_rewritten_in_place(digits, tmp_path, ablation):
    path = tmp_path / "zoo_style.onnx"
    onnx.save(zoo_style_graph(np.random.default_rng(0)), str(path))
    x = digits[2][:120]
    original = onnx_predictions(path.read_bytes(), x.numpy(), one_at_a_time=True)
    # labels the intact model gets right, so that removing a neuron moves the metric; two groups
    data = EvalData(x, torch.from_numpy(original), torch.arange(len(x)) % 2)
    game = game_of(path, data, ablation)
    assert [(layer.name, layer.size) for layer in game.layers] == [("conv1", 6), ("conv2", 8), ("fc1", 12)]
    values = torch.linspace(-1, 1, game.n_players)[
        torch.randperm(game.n_players, generator=torch.Generator().manual_seed(0))
    ]
    neurons = ranked(game, values)
    picks = [("conv1", 2), ("conv1", 4), ("conv2", 5), ("fc1", 0), ("fc1", 7)]  # after Dropout; after the folded Add
    edit = run_edit(game, neurons, {"neurons": [{"layer": layer, "index": i} for layer, i in picks]}, data)
    assert edit["metrics"]["job_data"]["before"] > edit["metrics"]["job_data"]["after"]
    model = edited_onnx(path, game, edit["removed"])
    assert_reproduces(edit, onnx_predictions(model, x.numpy(), one_at_a_time=True), data)
    edited = onnx.load_from_string(model)
    assert edited.opset_import[0].version == 9 and edited.ir_version == 3
    gated = {n.input[0] for n in edited.graph.node if n.op_type == "Mul"}
    assert gated == {"drop1_1_ungated", "relu2_1_ungated", "fc1_1_ungated"}  # after each chain, once per layer


def test_negative_removes_exactly_the_certified_negative_neurons(tiny_cnn, cnn):
    data, games, values = cnn
    game = games()
    neurons = ranked(game, values, half_width=values.abs() * 0.5 + 1e-4)
    for i in (0, 3):  # two certainly negative (upper < 0), two whose intervals only reach below 0
        neurons[-1 - i]["value"], neurons[-1 - i]["lower"], neurons[-1 - i]["upper"] = -0.05, -0.08, -0.02
    for i in (1, 2):
        neurons[-1 - i]["value"], neurons[-1 - i]["lower"], neurons[-1 - i]["upper"] = -0.01, -0.03, 0.01
    edit = run_edit(game, neurons, {"negative": True}, data)
    certified = sorted((n["layer"], n["index"]) for n in neurons if n["upper"] < 0)
    assert len(certified) == 2
    assert sorted((r["layer"], r["index"]) for r in edit["removed"]) == certified
    assert all(r["upper"] < 0 for r in edit["removed"])
    names = game.player_names()
    keep = torch.tensor([name not in certified for name in names])
    assert edit["metrics"]["job_data"]["after"] == game.full_values(keep.unsqueeze(0)).item()

    for n in neurons:
        n["upper"] = max(n["upper"], 0.0)
    none = run_edit(game, neurons, {"negative": True}, data)
    assert none["removed"] == [] and none["metrics"]["job_data"]["after"] == none["metrics"]["job_data"]["before"]


def test_repair_keeps_the_count_with_the_best_held_out_metric(tiny_mlp, digits):
    data = load_data(tiny_mlp.npz)
    game = game_of(tiny_mlp.pt2, data)
    neurons = ranked(game, leave_one_out(game))
    x, y = digits[2][150:450], digits[3][150:450]
    held_out = EvalData(x, y, torch.arange(len(x)) % 2)
    edit = run_edit(game, neurons, {"repair": {"max_neurons": 6}}, data, held_out)
    curve = edit["curve"]
    assert [p["removed"] for p in curve] == list(range(7))
    held = edit["metrics"]["held_out"]
    assert curve[0]["held_out"] == held["before"] and curve[0]["job_data"] == edit["metrics"]["job_data"]["before"]
    best = max(p["held_out"] for p in curve)
    assert held["after"] == best >= held["before"]  # never worse than removing none
    kept = len(edit["removed"])
    assert curve[kept]["held_out"] == best and all(p["held_out"] < best for p in curve[:kept])  # the fewest
    lowest = [(n["layer"], n["index"]) for n in neurons[::-1]]
    assert [(r["layer"], r["index"]) for r in edit["removed"]] == lowest[:kept]
    assert set(held["groups"]) == {"0", "1"}
    # the held-out curve is the game's own evaluation: a game built on the held-out data agrees (zero fill)
    other = game_of(tiny_mlp.pt2, held_out)
    names = game.player_names()
    masks = torch.ones(len(curve), game.n_players, dtype=torch.bool)
    for c in range(len(curve)):
        masks[c, [names.index(p) for p in lowest[:c]]] = False
    assert other.full_values(masks).tolist() == [p["held_out"] for p in curve]


def test_prune_removes_the_lowest_valued_to_a_count_or_fraction_along_a_curve(tiny_cnn, cnn):
    data, games, values = cnn
    game = games()
    neurons = ranked(game, values)
    by_count = run_edit(game, neurons, {"prune": {"count": 4}}, data)
    by_fraction = run_edit(game, neurons, {"prune": {"fraction": 0.45}}, data)  # ⌊0.45 · 10⌋ = 4
    assert (
        by_count["removed"]
        == by_fraction["removed"]
        == [{k: n[k] for k in ("layer", "index", "value", "lower", "upper")} for n in neurons[::-1][:4]]
    )
    names = game.player_names()
    masks = torch.ones(5, game.n_players, dtype=torch.bool)
    for c in range(5):
        masks[c, [names.index((n["layer"], n["index"])) for n in neurons[::-1][:c]]] = False
    assert [p["job_data"] for p in by_count["curve"]] == game.full_values(masks).tolist()
    assert by_count["curve"][-1]["job_data"] == by_count["metrics"]["job_data"]["after"]
    assert all(p["held_out"] is None for p in by_count["curve"]) and by_count["metrics"]["held_out"] is None


def test_a_long_prune_curve_is_drawn_at_evenly_spaced_counts(tiny_cnn, cnn, monkeypatch):
    data, games, values = cnn
    game = games()
    monkeypatch.setattr("worker.shapley.editing.CURVE_POINTS", 4)
    plan = resolve_selection(game, ranked(game, values), {"prune": {"fraction": 1.0}}, False)
    assert plan.count == 10 and plan.counts == (0, 4, 8, 10)
    assert resolve_selection(game, ranked(game, values), {"prune": {"count": 3}}, False).counts == (0, 1, 2, 3)


@pytest.mark.parametrize(
    ("selection", "held_out", "field", "says"),
    [
        ({"neurons": [{"layer": "conv9", "index": 0}]}, False, "selection", "its layers are: conv1, conv2"),
        ({"neurons": [{"layer": "conv1", "index": 4}]}, False, "selection", "neurons 0..3"),
        ({"neurons": [{"layer": "conv1", "index": 1}, {"layer": "conv1", "index": 1}]}, False, "selection", "twice"),
        ({"top": 11}, False, "selection", "from 1 to 10"),
        ({"bottom": 0}, False, "selection", "from 1 to 10"),
        ({"prune": {"count": 11}}, False, "selection", "from 1 to 10"),
        ({"prune": {"fraction": 0.05}}, False, "selection", "removes none"),
        ({"prune": {"fraction": 1.5}}, False, "selection", "(0, 1]"),
        ({"repair": {"max_neurons": 3}}, False, "data", "held-out data"),
        ({"top": 2, "bottom": 2}, False, "selection", "exactly one"),
        ({"negative": False}, False, "selection", "must be true"),
    ],
)
def test_bad_selections_name_the_field_and_the_fix(tiny_cnn, cnn, selection, held_out, field, says):
    data, games, values = cnn
    game = games()
    with pytest.raises(EditError) as err:
        resolve_selection(game, ranked(game, values), selection, held_out)
    assert err.value.field == field and says in str(err.value)


def test_held_out_data_of_another_shape_or_without_the_metrics_groups_is_refused(tiny_cnn, cnn):
    data, games, values = cnn
    game = games()
    neurons = ranked(game, values)
    wrong = EvalData(torch.zeros(5, 1, 9, 9), torch.zeros(5, dtype=torch.long))
    with pytest.raises(EditError, match=r"\(1, 9, 9\) per example, the job's data \(1, 8, 8\)") as err:
        run_edit(game, neurons, {"top": 1}, data, wrong)
    assert err.value.field == "data"
    fair = game_of(tiny_cnn.pt2, data, metric=MetricSpec("group_gap", groups=(0, 1)))
    no_groups = EvalData(data.inputs[:20], data.labels[:20])
    with pytest.raises(EditError, match="needs a `groups` array") as err:
        run_edit(fair, ranked(fair, values), {"top": 1}, data, no_groups)
    assert err.value.field == "data"
