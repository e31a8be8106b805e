"""The ops today's torchvision/timm exports use, one small graph each, checked against onnxruntime.

Every case runs at batch 2 or more on random inputs with a tight tolerance:
a silently wrong conversion gives silently wrong Shapley values.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from tests.harness.archs import assert_matches_onnxruntime, i64, onnx_graph, rand
from worker.shapley.errors import ModelError
from worker.shapley.onnx_import import onnx_to_graph_module
from worker.shapley.players import gate_site

N = helper.make_node
F32 = np.float32


def _se(opset: int) -> list[onnx.NodeProto]:
    """Squeeze-excitation: pool, two 1x1 convs, a Sigmoid gate multiplying the input."""
    return [
        N("GlobalAveragePool", ["x"], ["p"]),
        N("Conv", ["p", "se1.weight", "se1.bias"], ["s1"]),
        N("Relu", ["s1"], ["r"]),
        N("Conv", ["r", "se2.weight", "se2.bias"], ["s2"]),
        N("Sigmoid", ["s2"], ["g"]),
        N("Mul", ["g", "x"], ["y"]),
    ]


def _layer_norm_decomposed() -> list[onnx.NodeProto]:
    """LayerNorm as opset<17 exports write it: ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add."""
    return [
        N("ReduceMean", ["x"], ["m"], axes=[-1]),
        N("Sub", ["x", "m"], ["d"]),
        N("Pow", ["d", "two"], ["sq"]),
        N("ReduceMean", ["sq"], ["v"], axes=[-1]),
        N("Add", ["v", "eps"], ["ve"]),
        N("Sqrt", ["ve"], ["s"]),
        N("Div", ["d", "s"], ["n"]),
        N("Mul", ["n", "g"], ["ng"]),
        N("Add", ["ng", "b"], ["y"]),
    ]


def _gelu_decomposed() -> list[onnx.NodeProto]:
    """GELU as opset<20 exports write it: x * 0.5 * (1 + erf(x / sqrt 2))."""
    return [
        N("Div", ["x", "sqrt2"], ["d"]),
        N("Erf", ["d"], ["e"]),
        N("Add", ["e", "one"], ["a"]),
        N("Mul", ["x", "a"], ["m"]),
        N("Mul", ["m", "half"], ["y"]),
    ]


def _shape_reshape_chain() -> list[onnx.NodeProto]:
    """x.view(x.size(0), -1) as the legacy exporter writes it: Shape, Gather, Unsqueeze, Concat, Reshape."""
    return [
        N("Shape", ["x"], ["s"]),
        N("Gather", ["s", "zero"], ["n"], axis=0),
        N("Unsqueeze", ["n", "ax0"], ["nu"]),
        N("Concat", ["nu", "minus1"], ["shape"], axis=0),
        N("Reshape", ["x", "shape"], ["y"]),
    ]


def _chunk_by_shape() -> list[onnx.NodeProto]:
    """torch.chunk as the legacy exporter writes it: Slice bounds computed from Shape at run time."""
    return [
        N("Shape", ["x"], ["s"]),
        N("Gather", ["s", "one"], ["c"], axis=0),
        N("Div", ["c", "two"], ["h"]),
        N("Unsqueeze", ["h", "ax0"], ["hu"]),
        N("Slice", ["x", "zero1", "hu", "one1"], ["a"]),
        N("Slice", ["x", "hu", "big", "one1"], ["b"]),
        N("Sub", ["b", "a"], ["y"]),
    ]


# name: (nodes, initializers, opset, input shape[, output shape where inference cannot tell])
# fmt: off
CASES = {
    "hardswish": ([N("HardSwish", ["x"], ["y"])], {}, 14, (2, 3, 4, 4)),
    "hardsigmoid-default": ([N("HardSigmoid", ["x"], ["y"])], {}, 13, (2, 3, 4, 4)),
    "hardsigmoid-torch": ([N("HardSigmoid", ["x"], ["y"], alpha=1 / 6)], {}, 13, (2, 3, 4, 4)),
    "hardsigmoid-custom": ([N("HardSigmoid", ["x"], ["y"], alpha=0.3, beta=0.4)], {}, 17, (3, 5)),
    "squeeze-excitation": (
        _se(13), {"se1.weight": rand(2, 3, 1, 1), "se1.bias": rand(2), "se2.weight": rand(3, 2, 1, 1),
                  "se2.bias": rand(3)}, 13, (2, 3, 5, 5)),
    "clip-relu6-inputs": (  # the input scaled so that both bounds clip
        [N("Mul", ["x", "k"], ["x4"]), N("Clip", ["x4", "lo", "hi"], ["y"])],
        {"k": F32(4), "lo": F32(0), "hi": F32(6)}, 13, (2, 3, 4)),
    "clip-attributes-opset10": (
        [N("Mul", ["x", "k"], ["x4"]), N("Clip", ["x4"], ["y"], min=0.0, max=6.0)], {"k": F32(4)}, 10, (2, 3, 4)),
    "channel-shuffle": (
        [N("Reshape", ["x", "s1"], ["r"]), N("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3, 4]),
         N("Reshape", ["t", "s2"], ["y"])], {"s1": i64(0, 2, 3, 4, 5), "s2": i64(0, -1, 4, 5)}, 13, (2, 6, 4, 5)),
    "global-average-pool": ([N("GlobalAveragePool", ["x"], ["y"])], {}, 13, (2, 3, 4, 5)),
    "reducemean-hw-keepdims": ([N("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=1)], {}, 13, (2, 3, 4, 5)),
    "reducemean-hw-flat": ([N("ReduceMean", ["x", "ax"], ["y"], keepdims=0)], {"ax": i64(-2, -1)}, 18, (2, 3, 4, 5)),
    "concat-branches": (
        [N("Conv", ["x", "a.weight"], ["a"]), N("Conv", ["x", "b.weight"], ["b"], pads=[1, 1, 1, 1]),
         N("MaxPool", ["x"], ["p"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),
         N("Concat", ["a", "b", "p"], ["y"], axis=1)],
        {"a.weight": rand(2, 3, 1, 1), "b.weight": rand(4, 3, 3, 3)}, 13, (2, 3, 5, 5)),
    "conv-grouped": ([N("Conv", ["x", "w"], ["y"], group=2, pads=[1, 1, 1, 1])], {"w": rand(6, 2, 3, 3)}, 13,
                     (2, 4, 5, 5)),
    "conv-depthwise-strided": (
        [N("Conv", ["x", "w", "b"], ["y"], group=4, strides=[2, 2], pads=[1, 1, 1, 1])],
        {"w": rand(4, 1, 3, 3), "b": rand(4)}, 13, (2, 4, 7, 7)),
    "layernorm-opset17": (
        [N("LayerNormalization", ["x", "g", "b"], ["y"], epsilon=1e-6)], {"g": rand(6), "b": rand(6)}, 17, (2, 3, 6)),
    "layernorm-axis-no-bias": ([N("LayerNormalization", ["x", "g"], ["y"], axis=1)], {"g": rand(3, 4)}, 17, (2, 3, 4)),
    "layernorm-broadcast-scale": (
        [N("LayerNormalization", ["x", "g", "b"], ["y"], axis=-2)], {"g": rand(1, 4), "b": rand(4)}, 17, (2, 3, 4)),
    "layernorm-decomposed": (
        _layer_norm_decomposed(), {"two": F32(2), "eps": F32(1e-5), "g": rand(6), "b": rand(6)}, 13, (2, 3, 6)),
    "gelu-opset20": ([N("Gelu", ["x"], ["y"])], {}, 20, (2, 3, 6)),
    "gelu-tanh-opset20": ([N("Gelu", ["x"], ["y"], approximate="tanh")], {}, 20, (2, 3, 6)),
    "gelu-decomposed": (
        _gelu_decomposed(), {"sqrt2": F32(np.sqrt(2)), "one": F32(1), "half": F32(0.5)}, 13, (2, 3, 6)),
    "matmul-batched-4d": (
        [N("Transpose", ["x"], ["t"], perm=[0, 1, 3, 2]), N("MatMul", ["x", "t"], ["y"])], {}, 13, (2, 3, 4, 5)),
    "matmul-batched-broadcast": ([N("Relu", ["w"], ["r"]), N("MatMul", ["x", "r"], ["y"])], {"w": rand(3, 5, 2)}, 13,
                                 (2, 3, 4, 5)),
    "einsum-attention-scores": (
        [N("Einsum", ["x", "x"], ["y"], equation="bhqd,bhkd->bhqk")], {}, 12, (2, 3, 4, 5)),
    "einsum-attention-values": (
        [N("Transpose", ["x"], ["t"], perm=[0, 1, 3, 2]), N("Einsum", ["t", "x"], ["y"], equation="bhij,bhjd->bhid")],
        {}, 12, (2, 3, 4, 4)),
    "einsum-ellipsis-transpose": ([N("Einsum", ["x"], ["y"], equation="...ij->...ji")], {}, 12, (2, 3, 4, 5)),
    "softmax-last": ([N("Softmax", ["x"], ["y"], axis=-1)], {}, 13, (2, 3, 4, 5)),
    "transpose-perm": ([N("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1])], {}, 13, (2, 3, 4, 5)),
    "split-input-uneven": (
        [N("Split", ["x", "sp"], ["a", "b"], axis=1), N("Concat", ["b", "a"], ["y"], axis=1)],
        {"sp": i64(1, 4)}, 13, (2, 5, 3)),
    "split-attribute": (
        [N("Split", ["x"], ["a", "b", "c"], axis=-1, split=[2, 1, 3]), N("Concat", ["c", "a", "b"], ["y"], axis=-1)],
        {}, 11, (2, 3, 6)),
    "split-equal": ([N("Split", ["x"], ["a", "b"], axis=1), N("Mul", ["a", "b"], ["y"])], {}, 13, (2, 6, 3)),
    "split-num-outputs": (
        [N("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3), N("Concat", ["c", "b", "a"], ["y"], axis=1)],
        {}, 18, (2, 7, 3)),
    "slice-runtime-bounds": (
        _chunk_by_shape(), {"one": np.int64(1), "two": np.int64(2), "ax0": i64(0), "zero1": i64(0), "one1": i64(1),
                            "big": i64(2 ** 62)}, 13, (2, 6, 3)),
    "slice-negative-step": (
        [N("Slice", ["x", "st", "en", "ax", "sp"], ["y"])],
        {"st": i64(-1, 4), "en": i64(-100, 0), "ax": i64(1, 2), "sp": i64(-1, -2)}, 13, (2, 4, 6)),
    "gather-tokens": ([N("Gather", ["x", "i"], ["y"], axis=1)], {"i": np.int64(0)}, 13, (2, 3, 4)),
    "unsqueeze-squeeze-inputs": (
        [N("Unsqueeze", ["x", "ax"], ["u"]), N("Squeeze", ["u", "ax"], ["y"])], {"ax": i64(2)}, 13, (2, 3, 4)),
    "unsqueeze-squeeze-attrs": (
        [N("Unsqueeze", ["x"], ["u"], axes=[-1]), N("Squeeze", ["u"], ["y"], axes=[-1])], {}, 11, (2, 3, 4)),
    "resize-nearest-scales": (
        [N("Resize", ["x", "", "sc"], ["y"], mode="nearest", coordinate_transformation_mode="asymmetric",
           nearest_mode="floor")], {"sc": np.array([1, 1, 2, 3], F32)}, 13, (2, 3, 4, 5)),
    "resize-nearest-sizes": (
        [N("Resize", ["x", "", "", "sz"], ["y"], mode="nearest", coordinate_transformation_mode="asymmetric",
           nearest_mode="floor")], {"sz": i64(2, 3, 7, 3)}, 13, (2, 3, 4, 5)),
    "resize-nearest-exact": (
        [N("Resize", ["x", "", "", "sz"], ["y"], mode="nearest", coordinate_transformation_mode="half_pixel",
           nearest_mode="round_prefer_ceil")], {"sz": i64(2, 3, 6, 9)}, 13, (2, 3, 4, 5)),
    "resize-linear-half-pixel": (
        [N("Resize", ["x", "", "sc"], ["y"], mode="linear", coordinate_transformation_mode="half_pixel")],
        {"sc": np.array([1, 1, 2, 0.5], F32)}, 13, (2, 3, 4, 6)),
    "resize-linear-pytorch-half-pixel": (
        [N("Resize", ["x", "", "", "sz"], ["y"], mode="linear", coordinate_transformation_mode="pytorch_half_pixel")],
        {"sz": i64(2, 3, 9, 4)}, 13, (2, 3, 4, 6)),
    "resize-linear-align-corners": (
        [N("Resize", ["x", "", "", "sz"], ["y"], mode="linear", coordinate_transformation_mode="align_corners")],
        {"sz": i64(2, 3, 7, 2)}, 13, (2, 3, 4, 6)),
    "resize-linear-1d": (
        [N("Resize", ["x", "", "sc"], ["y"], mode="linear")], {"sc": np.array([1, 1, 2.5], F32)}, 13, (2, 3, 4)),
    "upsample-opset9": (  # upgraded to a Resize with the default half_pixel, round_prefer_floor
        [N("Upsample", ["x", "sc"], ["y"], mode="nearest")], {"sc": np.array([1, 1, 2, 3], F32)}, 9, (2, 3, 3, 4)),
    "resize-nearest-default-integer-sizes": (
        [N("Resize", ["x", "", "", "sz"], ["y"], mode="nearest")], {"sz": i64(2, 3, 9, 8)}, 13, (2, 3, 3, 4)),
    "where-equal": (
        [N("Equal", ["i", "k"], ["c"]), N("Where", ["c", "x", "z"], ["y"])],
        {"i": i64(0, 1, 2, 1), "k": np.int64(1), "z": rand(3, 1)}, 13, (2, 3, 4)),
    "max-min-mean-nary": (
        [N("Max", ["x", "a", "b"], ["m"]), N("Min", ["m", "x"], ["n"]), N("Mean", ["n", "a", "x"], ["y"])],
        {"a": rand(4), "b": rand(3, 1)}, 13, (2, 3, 4)),
    "expand-both-ways": ([N("Expand", ["x", "s"], ["y"])], {"s": i64(2, 1, 3, 4)}, 13, (2, 1, 4)),
    "expand-runtime-shape": (
        [N("Shape", ["x"], ["s"]), N("Expand", ["t", "s"], ["y"])], {"t": rand(1, 4)}, 13, (3, 2, 4)),
    "tile": ([N("Tile", ["x", "r"], ["y"])], {"r": i64(1, 2, 3)}, 13, (2, 3, 2)),
    "pad-reflect": ([N("Pad", ["x", "p"], ["y"], mode="reflect")], {"p": i64(0, 0, 1, 2, 0, 0, 2, 1)}, 13,
                    (2, 3, 4, 5)),
    "pad-edge": ([N("Pad", ["x", "p"], ["y"], mode="edge")], {"p": i64(0, 0, 2, 0, 0, 0, 0, 3)}, 13, (2, 3, 4, 5)),
    "pad-wrap": ([N("Pad", ["x", "p"], ["y"], mode="wrap")], {"p": i64(0, 0, 1, 1, 0, 0, 1, 2)}, 19, (2, 3, 4, 5)),
    "cast-round-trip": (
        [N("Cast", ["x"], ["c"], to=TensorProto.DOUBLE), N("Cast", ["c"], ["y"], to=TensorProto.FLOAT)], {}, 13,
        (2, 3)),
    "shape-driven-reshape": (
        _shape_reshape_chain(), {"zero": np.int64(0), "ax0": i64(0), "minus1": i64(-1)}, 13, (3, 2, 4, 5), ("n", 40)),
    "identity-dropout": (
        [N("Identity", ["x"], ["i"]), N("Dropout", ["i"], ["y"])], {}, 13, (2, 3)),
}
# fmt: on


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_op_matches_onnxruntime(case):
    nodes, consts, opset, x_shape, *y_shape = case
    model = onnx_graph(nodes, consts, opset, x_shape, y_shape=y_shape[0] if y_shape else None)
    assert_matches_onnxruntime(model, x_shape, 1e-5)


def test_relu6_and_hardsigmoid_are_ops_the_mask_moves_past():
    # A removed neuron must be silent after its activation, not hardsigmoid(0) = 0.5 or clip's bound.
    nodes = [
        N("Conv", ["x", "c1.weight"], ["c1"]),
        N("Clip", ["c1", "lo", "hi"], ["r"]),
        N("Conv", ["r", "c2.weight"], ["c2"]),
        N("HardSigmoid", ["c2"], ["y"], alpha=1 / 6),
    ]
    consts = {"c1.weight": rand(2, 3, 1, 1), "c2.weight": rand(3, 2, 1, 1), "lo": F32(0), "hi": F32(6)}
    gm = onnx_to_graph_module(onnx_graph(nodes, consts, 13, (2, 3, 4, 4)).SerializeToString())
    sites = {n.meta["layer"]: gate_site(n).target for n in gm.graph.nodes if "layer" in n.meta}
    assert sites == {"c1": torch.nn.functional.hardtanh, "c2": torch.nn.functional.hardsigmoid}


@pytest.mark.parametrize(
    "attrs, fragment",
    [
        ({"mode": "cubic"}, "mode=cubic"),
        ({"mode": "linear", "coordinate_transformation_mode": "asymmetric"}, "coordinate_transformation_mode=asym"),
        ({"mode": "nearest", "nearest_mode": "ceil"}, "nearest_mode=ceil"),
        ({"mode": "linear", "antialias": 1}, "antialias=1"),
    ],
)
def test_resize_without_a_torch_equivalent_is_refused_with_a_fix_on_the_file(attrs, fragment):
    model = onnx_graph([N("Resize", ["x", "", "sc"], ["y"], **attrs)], {"sc": np.array([1, 1, 2, 2], F32)}, 18)
    with pytest.raises(ModelError) as info:
        onnx_to_graph_module(model.SerializeToString())
    message = str(info.value)
    assert "Resize node" in message and fragment in message and "in the ONNX file with onnx.helper" in message


def test_default_nearest_resize_by_a_fraction_is_refused_at_run_time():
    # half_pixel with round_prefer_floor is torch's nearest only for whole-number upscaling.
    model = onnx_graph([N("Resize", ["x", "", "", "sz"], ["y"], mode="nearest")], {"sz": i64(2, 3, 5, 4)}, 13)
    gm = onnx_to_graph_module(model.SerializeToString())
    with pytest.raises(ModelError, match="whole-number factor"):
        gm(torch.zeros(2, 3, 7, 7))
