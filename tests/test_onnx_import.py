"""Tests for the ONNX -> torch.fx converter.

Models are exported inside the tests (no binary fixtures) and every converted
module is checked against onnxruntime, since a silently wrong conversion would
give silently wrong Shapley values.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper

from tests.harness.archs import assert_matches_onnxruntime, i64, onnx_graph, rand
from worker.shapley.errors import ModelError
from worker.shapley.onnx_import import onnx_to_graph_module

ATOL = 1e-4


class SmallCNN(nn.Module):
    input_shape = (3, 8, 8)
    layers = {"conv1": "conv", "conv2": "conv", "fc1": "linear", "fc2": "linear"}

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 3 * 3, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class ResidualNet(nn.Module):
    input_shape = (3, 9, 9)
    layers = {
        "stem": "conv",
        "layer1.0.conv1": "conv",
        "layer1.0.conv2": "conv",
        "gconv": "conv",
        "c1d": "conv",
        "proj": "linear",
        "head": "linear",
    }

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(Block(), nn.ReLU())
        self.gconv = nn.Conv2d(8, 8, 3, groups=4, padding=(1, 2), dilation=(1, 2))
        self.avg = nn.AvgPool2d(2, padding=1, ceil_mode=True, count_include_pad=False)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.c1d = nn.Conv1d(8, 4, 3, stride=2, padding=1)
        self.proj = nn.Linear(8, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.gconv(self.layer1(self.stem(x))))
        x = self.avg(x)
        pooled = self.gap(x).flatten(1)  # (b, 8)
        seq = x.flatten(2)  # (b, 8, L)
        gate = torch.sigmoid(self.c1d(seq)).mean((1, 2)).unsqueeze(1)  # (b, 1)
        tokens = torch.tanh(self.proj(seq.transpose(1, 2))).mean(1)  # Linear on 3-D: MatMul + Add
        return torch.softmax(self.head(tokens) + gate + pooled.sum(1, keepdim=True), -1)


def _export(model: nn.Module, path, dynamo: bool) -> None:
    example = torch.randn(2, *model.input_shape)
    if dynamo:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        )
    else:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "b"}},
        )


@pytest.fixture(
    scope="module",
    params=[(SmallCNN, False), (SmallCNN, True), (ResidualNet, False), (ResidualNet, True)],
    ids=["cnn-legacy", "cnn-dynamo", "residual-legacy", "residual-dynamo"],
)
def exported(request, tmp_path_factory):
    cls, dynamo = request.param
    torch.manual_seed(0)
    model = cls().eval()
    if isinstance(model, SmallCNN):  # non-trivial BN so folding it matters
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    _export(model, path, dynamo)
    return model, path, onnx_to_graph_module(path)


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_matches_onnxruntime_and_torch(exported, batch):
    model, path, gm = exported
    x = torch.randn(batch, *model.input_shape)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        got = gm(x)
        torch_out = model(x)
    assert got.shape == (batch, *expected.shape[1:])
    np.testing.assert_allclose(got.numpy(), expected, atol=ATOL)
    np.testing.assert_allclose(got.numpy(), torch_out.numpy(), atol=ATOL)


def test_layer_sites_are_named_functional_calls(exported):
    model, _, gm = exported
    sites = [n for n in gm.graph.nodes if "layer" in n.meta]
    assert {n.meta["layer"]: n.meta["layer_kind"] for n in sites} == model.layers
    for n in sites:
        assert n.op == "call_function"
        if n.meta["layer_kind"] == "linear":
            assert n.target is F.linear
            assert n.args[1].op == "get_attr"
        else:
            assert n.target in (F.conv1d, F.conv2d, F.conv3d)
            assert len(n.args) == 7 and n.args[1].op == "get_attr"


def test_fixed_batch_export_still_converts(tmp_path):
    # Without dynamic_axes the batch size is a fixed number in the file; the
    # converter must still build, and a later check tries other batch sizes.
    model = SmallCNN().eval()
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(model, (torch.randn(4, *model.input_shape),), str(path), dynamo=False, input_names=["x"])
    x = torch.randn(4, *model.input_shape)
    with torch.no_grad():
        np.testing.assert_allclose(onnx_to_graph_module(path)(x).numpy(), model(x).numpy(), atol=ATOL)


# --------------------------------------------------------------------------
# Single-op models built with onnx.helper, checked against onnxruntime.


N = helper.make_node
W = {"w": rand(4, 3, 3, 3), "b": rand(4)}
# name: (nodes, initializers, opset, input shape)
# fmt: off
OP_CASES = {
    "conv-asymmetric-pads": (
        [N("Conv", ["x", "w", "b"], ["y"], pads=[0, 1, 2, 0], strides=[2, 1])], W, 17, (2, 3, 7, 7)),
    "conv-same-upper": ([N("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])], W, 11, (2, 3, 8, 7)),
    "conv-same-lower": (
        [N("Conv", ["x", "w", "b"], ["y"], auto_pad="SAME_LOWER", strides=[2, 3])], W, 21, (2, 3, 8, 7)),
    "conv-valid": ([N("Conv", ["x", "w", "b"], ["y"], auto_pad="VALID")], W, 17, (2, 3, 7, 7)),
    "conv3d-group-dilation": (
        [N("Conv", ["x", "w3"], ["y"], group=2, dilations=[1, 2, 1], pads=[1, 1, 1, 1, 1, 1])],
        {"w3": rand(4, 2, 3, 3, 2)}, 17, (1, 4, 5, 6, 5)),
    "gemm-trans-alpha-beta": (
        [N("Gemm", ["x", "gw", "gc"], ["y"], alpha=0.5, beta=2.0, transA=1)],
        {"gw": rand(5, 4), "gc": rand(1, 4)}, 11, (5, 3)),
    "gemm-per-row-c": (
        [N("Gemm", ["x", "gw", "gc"], ["y"], beta=0.5, transB=1)],
        {"gw": rand(4, 5), "gc": rand(3, 4)}, 13, (3, 5)),
    "gemm-computed-b": (
        [N("Relu", ["gw"], ["r"]), N("Gemm", ["x", "r", "gc"], ["y"], alpha=2.0, transB=1)],
        {"gw": rand(4, 5), "gc": rand(4)}, 13, (3, 5)),
    "matmul-3d-no-bias": ([N("MatMul", ["x", "mw"], ["y"])], {"mw": rand(7, 2)}, 17, (2, 3, 7)),
    "matmul-add-bias-first": (
        [N("MatMul", ["x", "mw"], ["m"]), N("Add", ["mb", "m"], ["y"])],
        {"mw": rand(7, 2), "mb": rand(2)}, 17, (2, 3, 7)),
    "matmul-computed": (
        [N("Transpose", ["x"], ["t"], perm=[0, 2, 1]), N("MatMul", ["x", "t"], ["y"])], {}, 17, (2, 3, 7)),
    "softmax-opset11-coerced": ([N("Softmax", ["x"], ["y"], axis=1)], {}, 11, (2, 3, 4)),
    "logsoftmax-opset11-default": ([N("LogSoftmax", ["x"], ["y"])], {}, 11, (2, 3, 4)),
    "softmax-opset13-default": ([N("Softmax", ["x"], ["y"])], {}, 13, (2, 3, 4)),
    "logsoftmax-opset13-axis": ([N("LogSoftmax", ["x"], ["y"], axis=1)], {}, 13, (2, 3, 4)),
    "squeeze-unsqueeze-attrs": (
        [N("Unsqueeze", ["x"], ["u"], axes=[0, -1]), N("Squeeze", ["u"], ["y"], axes=[0])], {}, 11, (2, 3)),
    "squeeze-unsqueeze-inputs": (
        [N("Unsqueeze", ["x", "ax"], ["u"]), N("Squeeze", ["u"], ["y"])], {"ax": i64(1, 3)}, 13, (2, 3)),
    "reducemean-axes-input": (
        [N("ReduceMean", ["x", "ax"], ["y"], keepdims=0)], {"ax": i64(-1, 1)}, 18, (2, 3, 4)),
    "reducemean-axes-attr": ([N("ReduceMean", ["x"], ["y"], axes=[1])], {}, 13, (2, 3, 4)),
    "reducemean-all": ([N("ReduceMean", ["x"], ["y"])], {}, 18, (2, 3, 4)),
    "reducesum-noop": ([N("ReduceSum", ["x"], ["y"], noop_with_empty_axes=1)], {}, 13, (2, 3, 4)),
    "clip-min-only": ([N("Clip", ["x", "lo"], ["y"])], {"lo": np.float32(-0.2)}, 11, (2, 5)),
    "clip-max-only": ([N("Clip", ["x", "", "hi"], ["y"])], {"hi": np.float32(0.3)}, 13, (2, 5)),
    "pad-constant": (
        [N("Pad", ["x", "p", "v"], ["y"])],
        {"p": i64(0, 1, 2, 0, 0, 1, 0, 3), "v": np.float32(1.5)}, 11, (1, 2, 3, 3)),
    "pad-axes": (
        [N("Pad", ["x", "p", "", "ax"], ["y"])], {"p": i64(1, 0, 2, 3), "ax": i64(-1, 1)}, 18, (1, 2, 3, 3)),
    "maxpool-asym-ceil-dilated": (
        [N("MaxPool", ["x"], ["y"], kernel_shape=[3, 2], pads=[0, 1, 2, 0], strides=[2, 2], dilations=[1, 2],
           ceil_mode=1)], {}, 12, (1, 2, 9, 8)),
    "maxpool-same-upper": (
        [N("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")], {}, 12, (1, 2, 7, 8)),
    "avgpool-include-pad": (
        [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)],
        {}, 11, (1, 2, 7, 7)),
    "avgpool-asym-exclude-pad": (
        [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 2], pads=[2, 0, 0, 1], strides=[2, 1])], {}, 11, (1, 2, 7, 7)),
    "avgpool-asym-include-pad": (
        [N("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], pads=[1, 0, 0, 1], count_include_pad=1)],
        {}, 11, (1, 2, 6, 6)),
    "avgpool-ceil-include-pad": (
        [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1,
           count_include_pad=1)], {}, 19, (1, 2, 8, 8)),
    "avgpool-ceil-asym-exclude-pad": (
        [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 0, 1], ceil_mode=1)],
        {}, 19, (1, 2, 8, 8)),
    "avgpool1d-same-lower": (
        [N("AveragePool", ["x"], ["y"], kernel_shape=[4], strides=[3], auto_pad="SAME_LOWER")], {}, 11, (2, 3, 10)),
    "global-max-pool": ([N("GlobalMaxPool", ["x"], ["y"])], {}, 11, (2, 3, 5, 4)),
    "global-avg-pool-1d": ([N("GlobalAveragePool", ["x"], ["y"])], {}, 11, (2, 3, 5)),
    "batchnorm": (
        [N("BatchNormalization", ["x", "s", "bb", "m", "v"], ["y"], epsilon=1e-3)],
        {"s": rand(3), "bb": rand(3), "m": rand(3), "v": np.abs(rand(3)) + 0.5}, 15, (2, 3, 4, 4)),
    "reshape-zero-and-minus-one": ([N("Reshape", ["x", "sh"], ["y"])], {"sh": i64(0, -1, 2)}, 14, (2, 3, 4)),
    "flatten-axis-0": ([N("Flatten", ["x"], ["y"], axis=0)], {}, 13, (2, 3, 4)),
    "flatten-axis-neg": ([N("Flatten", ["x"], ["y"], axis=-1)], {}, 13, (2, 3, 4)),
    "transpose-default": ([N("Transpose", ["x"], ["y"])], {}, 13, (2, 3, 4)),
    "gather-scalar-negative": ([N("Gather", ["x", "i"], ["y"], axis=1)], {"i": np.int64(-1)}, 13, (2, 3, 4)),
    "gather-matrix": (
        [N("Gather", ["x", "i"], ["y"], axis=2)], {"i": i64(0, 3, 1, 1).reshape(2, 2)}, 13, (2, 3, 4)),
    "slice-steps": (
        [N("Slice", ["x", "st", "en", "ax", "sp"], ["y"])],
        {"st": i64(1, 0), "en": i64(100, -1), "ax": i64(2, -1), "sp": i64(2, 1)}, 13, (2, 3, 7, 5)),
    "shape-arithmetic": (  # x.reshape(-1, *(x.shape[1:] // 2)) through a runtime shape tensor
        [N("Shape", ["x"], ["s"], start=1), N("Div", ["s", "two"], ["h"]), N("Concat", ["bat", "h"], ["sh"], axis=0),
         N("Reshape", ["x", "sh"], ["y"])],
        {"two": i64(2, 2), "bat": i64(-1)}, 15, (3, 4, 6)),
    "cast-int": (
        [N("Mul", ["x", "k"], ["m"]), N("Cast", ["m"], ["y"], to=TensorProto.INT64)], {"k": np.float32(3)}, 13, (2, 5)),
    "activations": (
        [N("LeakyRelu", ["x"], ["a"], alpha=0.2), N("Elu", ["a"], ["b"], alpha=0.7),
         N("Gelu", ["b"], ["c"], approximate="tanh"), N("Erf", ["c"], ["d"]), N("Neg", ["d"], ["e"]),
         N("Exp", ["e"], ["f"]), N("Sqrt", ["f"], ["g"]), N("Log", ["g"], ["h"]), N("Pow", ["h", "p"], ["i"]),
         N("Sub", ["i", "x"], ["j"]), N("Dropout", ["j"], ["k"]), N("Identity", ["k"], ["y"])],
        {"p": np.float32(2)}, 20, (2, 5)),
    "constant-node": (
        [N("Constant", [], ["c"], value_floats=[1.0, 2.0, 3.0]), N("Mul", ["x", "c"], ["y"])], {}, 13, (2, 3)),
    "constantofshape-runtime-shape": (
        [N("Shape", ["x"], ["s"]), N("ConstantOfShape", ["s"], ["c"], value=helper.make_tensor("v", 1, [1], [1.5])),
         N("Add", ["x", "c"], ["y"])], {}, 13, (2, 3, 4)),
    "constantofshape-default-zero": (
        [N("ConstantOfShape", ["sh"], ["c"]), N("Add", ["x", "c"], ["y"])], {"sh": i64(3, 4)}, 9, (2, 3, 4)),
    "constantofshape-weight-folded": (  # the ONNX Model Zoo's weights are fills like this one
        [N("ConstantOfShape", ["ws"], ["w_0"], value=helper.make_tensor("v", 1, [1], [0.02])),
         N("Conv", ["x", "w_0"], ["y"])], {"ws": i64(4, 3, 3, 3)}, 9, (2, 3, 7, 7)),
    "sum-three-broadcast": ([N("Sum", ["x", "a", "x"], ["y"])], {"a": rand(4)}, 13, (2, 3, 4)),
    "sum-one": ([N("Sum", ["x"], ["y"])], {}, 8, (2, 3)),
    "lrn-odd": ([N("LRN", ["x"], ["y"], size=5, alpha=1e-2, beta=0.75, bias=2.0)], {}, 13, (2, 7, 4, 3)),
    "lrn-defaults": ([N("LRN", ["x"], ["y"], size=3)], {}, 13, (2, 6, 3, 3)),  # onnxruntime: odd size, 4-D only
    "lrn-opset9-wide": ([N("LRN", ["x"], ["y"], size=7, alpha=0.5, beta=1.5)], {}, 9, (2, 5, 4, 2)),
    "weight-behind-reshape": (  # Inception v1's classifier: Gemm whose B is a reshaped constant
        [N("Reshape", ["gw", "gs"], ["w"]), N("Gemm", ["x", "w", "gc"], ["y"], transB=1)],
        {"gw": rand(4, 5, 1, 1), "gs": i64(4, 5), "gc": rand(4)}, 9, (3, 5)),
}
# fmt: on


@pytest.mark.parametrize("case", OP_CASES.values(), ids=OP_CASES.keys())
def test_single_op_matches_onnxruntime(case):
    nodes, consts, opset, x_shape = case
    assert_matches_onnxruntime(onnx_graph(nodes, consts, opset, x_shape), x_shape, ATOL)


def test_layer_name_rules_and_uniqueness():
    w = rand(3, 3, 1, 1)
    scoped = N("Conv", ["c0", "w1"], ["c1"], name="node_conv2d_1")
    scoped.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'layer1', '0', 'conv1', 'conv2d']")
    nodes = [
        N("Conv", ["x", "shared.weight"], ["c0"]),  # (a) initializer name
        scoped,  # (b) name scopes
        N("Conv", ["c1", "w2"], ["c2"], name="/layer2/layer2.0/conv1/Conv"),  # (c) legacy node name
        N("Conv", ["c2", "w3"], ["c3"], name="my_conv"),  # (d) node name
        N("Conv", ["c3", "w4"], ["c4"]),  # (e) op type and index
        N("Conv", ["c4", "shared.weight"], ["c5"]),  # shared weight: same name again
        N("Conv", ["c5", "w5"], ["y"], name="shared_1"),  # already takes the first suffix
    ]
    consts = {k: w for k in ["shared.weight", "w1", "w2", "w3", "w4", "w5"]}
    gm = onnx_to_graph_module(onnx_graph(nodes, consts, 17, (1, 3, 4, 4)).SerializeToString())
    names = [n.meta["layer"] for n in gm.graph.nodes if "layer" in n.meta]
    assert names == [
        "shared",
        "layer1.0.conv1",
        "layer2.0.conv1",
        "my_conv",
        "conv_4",
        "shared_2",
        "shared_1",
    ]


# --------------------------------------------------------------------------
# Refusals: each says what is wrong and how to fix it.


def _raises(source, *fragments):
    with pytest.raises(ModelError) as info:
        onnx_to_graph_module(source)
    for fragment in fragments:
        assert fragment in str(info.value)


def _tiny_model() -> onnx.ModelProto:
    return onnx_graph([N("Conv", ["x", "w", "b"], ["y"])], W, 17)


def test_rejects_random_bytes(tmp_path):
    junk = np.random.default_rng(0).bytes(4096)
    _raises(junk, "is not a valid ONNX model", "torch.onnx.export")
    (tmp_path / "junk.onnx").write_bytes(junk)
    _raises(tmp_path / "junk.onnx", "is not a valid ONNX model", "torch.onnx.export")


def test_rejects_truncated_file(tmp_path):
    data = _tiny_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    _raises(path, "is not a valid ONNX model", "torch.onnx.export")


def test_rejects_custom_domain():
    nodes = [N("Relu", ["x"], ["r"]), N("FancyOp", ["r"], ["y"], domain="com.example")]
    model = onnx_graph(nodes, extra_opsets=[helper.make_opsetid("com.example", 1)])
    _raises(model.SerializeToString(), "custom operators", "com.example::FancyOp", ".pt2")


def test_rejects_unsupported_ops_all_at_once():
    nodes = [
        N("Hardmax", ["x"], ["h"]),
        N("LSTM", ["h", "lw", "lr"], ["y"], hidden_size=2),
    ]
    model = onnx_graph(nodes, {"lw": rand(1, 8, 7), "lr": rand(1, 8, 2)}, 17, (7, 1, 7))
    _raises(model.SerializeToString(), "does not support: Hardmax, LSTM", "re-export", ".pt2")


def test_rejects_external_data(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        _tiny_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=True, size_threshold=0
    )
    _raises(path, "external data", "save_as_external_data=False")


def test_rejects_several_inputs_or_outputs():
    two_in = _tiny_model()
    two_in.graph.input.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1]))
    _raises(two_in.SerializeToString(), "2 inputs (x, z)", "make them initializers in the ONNX file")
    two_out = onnx_graph([N("Relu", ["x"], ["y"]), N("Neg", ["x"], ["n"])])
    two_out.graph.output.append(helper.make_tensor_value_info("n", TensorProto.FLOAT, None))
    _raises(two_out.SerializeToString(), "2 outputs (y, n)", "Keep only the class scores in the file")


def test_refusals_name_a_fix_on_the_onnx_file():
    nodes = [N("Shape", ["x"], ["s"], start=1), N("ReduceSum", ["x", "s"], ["y"])]  # axes = x.shape[1:] = [1]
    runtime_axes = onnx_graph(nodes, {}, 15, (2, 1), y_shape=(2, 1))
    _raises(runtime_axes.SerializeToString(), "computes its axes at run time", "onnxsim model.onnx out.onnx")
    dilated = onnx_graph([N("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2])], {}, 19)
    _raises(dilated.SerializeToString(), "uses dilations", "by a depthwise Conv")
    used_mask = onnx_graph([N("Dropout", ["x"], ["d", "mask"]), N("Cast", ["mask"], ["y"], to=TensorProto.FLOAT)])
    _raises(used_mask.SerializeToString(), "optional output 'mask'", "Remove its uses from the ONNX file")


def test_folded_weight_is_a_layer_named_after_the_weight():
    nodes = [
        N("ConstantOfShape", ["ws"], ["conv1_w_0"], value=helper.make_tensor("v", 1, [1], [0.02])),
        N("Conv", ["x", "conv1_w_0"], ["c"]),
        N("Flatten", ["c"], ["f"]),
        N("Reshape", ["fc_w_0", "gs"], ["w"]),
        N("Gemm", ["f", "w", "fc_b_0"], ["y"], transB=1),
    ]
    consts = {"ws": i64(4, 3, 3, 3), "fc_w_0": rand(2, 4 * 25, 1), "gs": i64(2, 100), "fc_b_0": rand(2)}
    gm = onnx_to_graph_module(onnx_graph(nodes, consts, 9, (1, 3, 7, 7)).SerializeToString())
    assert gm.meta["onnx_upgraded_from_opset"] == 9
    sites = {n.meta["layer"]: n.meta["layer_kind"] for n in gm.graph.nodes if "layer" in n.meta}
    assert sites == {"conv1": "conv", "fc": "linear"}


def test_batch_fixed_at_one_is_freed_only_where_provable():
    # [1, 3, 4, 4] input, Reshape to [1, 48] before the classifier (Caffe2 style): the 1 is the batch.
    nodes = [
        N("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        N("Reshape", ["c", "sh"], ["r"]),
        N("Gemm", ["r", "gw", "gb"], ["y"], transB=1),
    ]
    consts = {**W, "sh": i64(1, 64), "gw": rand(5, 64), "gb": rand(5)}
    model = onnx_graph(nodes, consts, 11, (1, 3, 4, 4))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    gm = onnx_to_graph_module(model.SerializeToString())
    assert gm.meta["onnx_batch_reshapes_rewritten"] == 1
    x = rand(3, 3, 4, 4)
    expected = np.concatenate([session.run(None, {"x": x[i : i + 1]})[0] for i in range(3)])
    with torch.no_grad():
        np.testing.assert_allclose(gm(torch.from_numpy(x)).numpy(), expected, atol=ATOL, rtol=1e-5)
    # With a symbolic batch, Reshape(x, [1, -1]) is the author's (it merges the batch): kept as written.
    merge = onnx_graph([N("Reshape", ["x", "sh"], ["y"])], {"sh": i64(1, -1)}, 13, ("n", 3))
    gm = onnx_to_graph_module(merge.SerializeToString())
    assert gm.meta["onnx_batch_reshapes_rewritten"] == 0
    assert gm(torch.zeros(4, 3)).shape == (1, 12)


def test_upgrade_failure_names_a_fix_on_the_file(monkeypatch):
    import onnx.version_converter

    def fail(model, version):
        raise RuntimeError("No adapter for op Upsample")

    monkeypatch.setattr(onnx.version_converter, "convert_version", fail)
    model = onnx_graph([N("Relu", ["x"], ["y"])], {}, 9, (2, 3))
    _raises(model.SerializeToString(), "opset 9", "No adapter for op Upsample", "convert_version(onnx.load(")


def test_lrn_even_size_follows_the_onnx_window():
    # onnxruntime only runs odd sizes; the ONNX spec's window for channel c is
    # [c - floor((size-1)/2), c + ceil((size-1)/2)], which torch centres the other way for even sizes.
    size, alpha, beta, bias = 4, 0.3, 0.75, 1.5
    x = rand(2, 6, 3, 3)
    expected = np.empty_like(x)
    for c in range(6):
        lo, hi = max(0, c - (size - 1) // 2), min(5, c + size // 2)
        square_sum = (x[:, lo : hi + 1] ** 2).sum(1)
        expected[:, c] = x[:, c] / (bias + alpha / size * square_sum) ** beta
    model = onnx_graph([N("LRN", ["x"], ["y"], size=size, alpha=alpha, beta=beta, bias=bias)], {}, 13, x.shape)
    with torch.no_grad():
        got = onnx_to_graph_module(model.SerializeToString())(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
