"""The ONNX Model Zoo networks that ship inside the onnx wheel, loaded as users have them.

They are opset 9 (IR 3, initializers listed among the inputs), fix the batch
at 1, use ConstantOfShape, Sum and LRN, and two end in ``[N, C, 1, 1]``.
Their weights are ConstantOfShape fills (0.02 everywhere), so each test gives
them seeded random weights of the same shapes (and drops the final Softmax, so
logits are compared rather than saturated probabilities) and checks the converted module
against onnxruntime running the same file one image at a time (the file's
batch of 1), which also proves that freeing the batch is exact.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from tests.harness.zoo import MODELS, ZOO, randomized
from worker.shapley.loading import load_model
from worker.shapley.onnx_import import onnx_to_graph_module
from worker.shapley.players import find_layers, select_layers

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ZOO.is_dir(), reason="this onnx wheel ships no model zoo test data"),
]


@pytest.fixture(scope="module", params=MODELS)
def zoo(request, tmp_path_factory):
    name = request.param
    path = randomized(name, tmp_path_factory.mktemp("zoo") / f"{name}.onnx")
    start = time.perf_counter()
    gm = load_model(path)
    seconds = time.perf_counter() - start
    return name, path, gm, seconds


def test_matches_onnxruntime_at_other_batch_sizes(zoo):
    name, path, gm, _ = zoo
    assert gm.meta["onnx_upgraded_from_opset"] == 9
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    x = np.random.default_rng(1).standard_normal((3, 3, 224, 224)).astype(np.float32)
    expected = np.concatenate([session.run(None, {input_name: x[i : i + 1]})[0] for i in range(3)])
    expected = expected.reshape(3, -1)  # [N, C, 1, 1] scores are flattened by load_model
    with torch.no_grad():
        for batch in (2, 3):
            got = gm(torch.from_numpy(x[:batch])).numpy()
            assert got.shape == expected[:batch].shape
            np.testing.assert_array_equal(got.argmax(1), expected[:batch].argmax(1))
            scale = np.abs(expected).max()
            np.testing.assert_allclose(got, expected[:batch], rtol=1e-4, atol=1e-5 * scale)


def test_default_players_are_every_channel_but_the_classifier(zoo):
    name, path, gm, _ = zoo
    # Output channels of every Conv/Gemm from ONNX shape inference, independent of the converter.
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(ZOO / f"light_{name}.onnx")))  # the light original
    dims = {
        vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
        for vi in [*inferred.graph.value_info, *inferred.graph.output]
    }
    outs = [dims[n.output[0]][1] for n in inferred.graph.node if n.op_type in ("Conv", "Gemm")]
    layers = find_layers(gm)
    assert [layer.size for layer in layers] == outs
    assert [layer.name for layer in layers if layer.produces_output] == [layers[-1].name]
    assert sum(layer.size for layer in select_layers(layers, None)) == sum(outs) - outs[-1]
    if name == "inception_v1":  # its classifier's weight passes through a Reshape
        assert sum(outs) - outs[-1] == 7280
        assert layers[-1].name == "loss3/classifier"


def test_layer_names_are_the_weight_names():
    gm = onnx_to_graph_module(ZOO / "light_squeezenet.onnx")
    layers = find_layers(gm)
    names = [layer.name for layer in layers]
    assert names[:3] == ["conv1", "fire2/squeeze1x1", "fire2/expand1x1"]
    assert [layer.name for layer in select_layers(layers, ["fire9/*"])] == [
        "fire9/squeeze1x1",
        "fire9/expand1x1",
        "fire9/expand3x3",
    ]
    # Caffe2's device scope, shared by every layer, is dropped.
    resnet = [layer.name for layer in find_layers(onnx_to_graph_module(ZOO / "light_resnet50.onnx"))]
    assert resnet[:2] == ["conv1", "res2_0_branch2a"] and resnet[-1] == "pred"


def test_fully_convolutional_models_take_other_image_sizes():
    # SqueezeNet ends in GlobalAveragePool and a [N, C, 1, 1] output, so 96x96 images work (the file says 224).
    gm = load_model(ZOO / "light_squeezenet.onnx")
    with torch.no_grad():
        assert gm(torch.randn(2, 3, 96, 96)).shape == (2, 1000)


def test_images_smaller_than_the_graph_allows_are_refused_with_the_size_it_takes(tmp_path):
    """SqueezeNet's pooling collapses a 16x16 image to nothing: the error says so, where, and the size to use,
    rather than torch's 'Output size is too small' and advice about the batch dimension."""
    from worker.shapley import MetricSpec, NeuronGame
    from worker.shapley.data import EvalData
    from worker.shapley.errors import DataError

    model = load_model(randomized("squeezenet", tmp_path / "squeezenet.onnx"))
    data = EvalData(torch.rand(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))
    with pytest.raises(DataError) as refused:
        NeuronGame(model, data, MetricSpec("accuracy"))
    message = str(refused.value)
    assert "16x16" in message and "at node" in message and "is 32x32" in message and "resize" in message
    assert "dynamic batch" not in message
