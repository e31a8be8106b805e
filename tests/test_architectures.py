"""Today's architectures as users export them: ONNX (legacy and dynamo exporters, several opsets) and .pt2.

Each look-alike from ``tests/harness/archs.py`` is exported, loaded through
``load_model`` (the entry point a job uses) and checked: outputs match
onnxruntime (ONNX) or the eager module (.pt2) at batch 2 and 3, layer names
are the module paths, the default players are every conv/linear channel but
the classifier's, and the game builds, its grouped evaluation agreeing with
the plain one.
"""

from __future__ import annotations

import re

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

from tests.harness.archs import ARCHS, Exporter, build, export_onnx, export_pt2
from worker.shapley import MetricSpec, NeuronGame
from worker.shapley.data import EvalData
from worker.shapley.errors import DataError
from worker.shapley.loading import load_model
from worker.shapley.players import find_layers, select_layers

# (dynamo, opset): the legacy exporter at the opset before LayerNormalization and at the first with it,
# and the dynamo exporter (torch's default) at its default opset.
EXPORTERS: dict[str, Exporter] = {"legacy13": (False, 13), "legacy17": (False, 17), "dynamo18": (True, 18)}
# torch.export (behind the dynamo exporter and .pt2) takes seconds per model: those run with the slow tests.
_SLOW_FORMATS = {"dynamo18", "pt2"}
PARAMS = [
    pytest.param((arch, fmt), id=f"{arch}-{fmt}", marks=[pytest.mark.slow] if fmt in _SLOW_FORMATS else [])
    for arch in ARCHS
    for fmt in [*EXPORTERS, "pt2"]
]


@pytest.fixture(scope="module", params=PARAMS)
def loaded(request, tmp_path_factory):
    arch, fmt = request.param
    model = build(arch)
    directory = tmp_path_factory.mktemp(f"{arch}-{fmt}")
    if fmt == "pt2":
        path = export_pt2(model, directory / "model.pt2")
    else:
        path = export_onnx(model, directory / "model.onnx", EXPORTERS[fmt])
    return arch, fmt, model, path, load_model(path)


def _inputs(model: nn.Module, batch: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(batch).standard_normal((batch, *model.input_shape)).astype("f4"))


def _hidden_modules(model: nn.Module) -> dict[str, int]:
    """Module path -> output channels of every conv and linear module."""
    return {
        name: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


@pytest.mark.parametrize("batch", [2, 3])
def test_outputs_match_the_reference(loaded, batch):
    _, fmt, model, path, gm = loaded
    x = _inputs(model, batch)
    if fmt == "pt2":
        with torch.no_grad():
            expected = model(x).numpy()
    else:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (expected,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        got = gm(x).numpy()
    assert got.shape == expected.shape == (batch, 5)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_layers_are_module_paths_and_default_players_skip_the_classifier(loaded):
    _, _, model, _, gm = loaded
    modules = _hidden_modules(model)
    layers = find_layers(gm)
    assert {layer.name: layer.size for layer in layers} == modules
    classifier = list(modules)[-1]
    assert [layer.name for layer in layers if layer.produces_output] == [classifier]
    chosen = select_layers(layers, None)
    assert sum(layer.size for layer in chosen) == sum(modules.values()) - modules[classifier]


def test_the_game_builds_and_grouped_evaluation_agrees(loaded):
    _, _, model, _, gm = loaded
    x = _inputs(model, 12)
    with torch.no_grad():
        labels = model(x).argmax(1)
    data = EvalData(x, labels)
    grouped, plain = (
        NeuronGame(gm, data, MetricSpec("log_likelihood"), batch_size=6, grouped=g, device="cpu") for g in (True, False)
    )
    n = plain.n_players
    masks = torch.rand(6, n, generator=torch.Generator().manual_seed(0)) < 0.6
    masks[0] = True
    sample = plain.sample(torch.Generator().manual_seed(1), 2)
    lanes = torch.arange(6) % 2
    expected = plain.evaluate(sample, masks, lanes)
    torch.testing.assert_close(grouped.evaluate(sample, masks, lanes), expected, rtol=1e-4, atol=1e-5)
    # Keeping every neuron is the intact model.
    with torch.no_grad():
        intact = torch.log_softmax(model(x), 1)[torch.arange(12), labels].mean()
    torch.testing.assert_close(plain.full_values(torch.ones(1, n, dtype=torch.bool)), intact.double().reshape(1))


# --------------------------------------------------------------------------
# Data at another spatial size than the file declares.


def _game(gm: torch.fx.GraphModule, x: torch.Tensor) -> NeuronGame:
    return NeuronGame(gm, EvalData(x, torch.arange(len(x)) % 5), MetricSpec("accuracy"), batch_size=4, device="cpu")


_FIXED = {
    "fixed_pool": ("before layer 'classifier.0' needs 4 values per example", "by GlobalAveragePool"),
    "fixed_view": ("after layer 'features.0' needs 256 values per example", "Resize (or crop) the data to 16×16"),
}


@pytest.mark.parametrize(
    "arch, exporter",
    [
        pytest.param(arch, exporter, marks=[pytest.mark.slow] if exporter in _SLOW_FORMATS else [])
        for arch in _FIXED
        for exporter in ("legacy13", "dynamo18")
    ],
)
def test_a_graph_that_fixes_the_size_refuses_other_sizes_naming_the_construct_and_a_fix(arch, exporter, tmp_path):
    construct, fix = _FIXED[arch]
    model = build(arch)
    gm = load_model(export_onnx(model, tmp_path / "model.onnx", EXPORTERS[exporter]))
    assert gm(_inputs(model, 2)).shape == (2, 5)
    # 10×10 still fits the 8×8 pool window (one output) and the Flatten: the file allows it.
    if arch == "fixed_pool":
        with torch.no_grad():
            torch.testing.assert_close(gm(torch.ones(2, 3, 20, 20)), model(torch.ones(2, 3, 20, 20)))
    x = torch.randn(6, 3, 32, 32)
    with pytest.raises(DataError) as direct:
        gm(x)
    message = str(direct.value)
    assert re.match(r"(Flatten|Reshape) node '[^']+' ", message)
    assert construct in message and fix in message and "3×16×16 (the size the ONNX file declares)" in message
    # Building the game (what a job does) fails with the same error, with nothing of torch.fx's appended.
    with pytest.raises(DataError) as built:
        _game(gm, x)
    assert str(built.value) == message


@pytest.mark.parametrize("fmt", ["legacy13", pytest.param("pt2", marks=pytest.mark.slow)])
def test_fully_convolutional_graphs_with_global_pooling_take_other_sizes(fmt, tmp_path):
    model = build("resnet")  # declared 16×16; adaptive average pooling before the classifier
    if fmt == "pt2":
        program = torch.export.export(
            model,
            (torch.randn(2, 3, 16, 16),),
            dynamic_shapes={"x": {0: torch.export.Dim("batch"), 2: torch.export.Dim("h", min=16, max=64), 3: None}},
        )
        torch.export.save(program, str(tmp_path / "model.pt2"))
        gm = load_model(tmp_path / "model.pt2")
    else:
        gm = load_model(export_onnx(model, tmp_path / "model.onnx", EXPORTERS[fmt]))
    x = torch.randn(6, 3, 24, 16) if fmt == "pt2" else torch.randn(6, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
    game = _game(gm, x)
    assert game.n_players == sum(_hidden_modules(model).values()) - 5
