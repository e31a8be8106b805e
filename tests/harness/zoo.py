"""The ONNX Model Zoo networks that ship inside the onnx wheel, with real weights: for the tests and the benchmarks.

The wheel ships the classic zoo graphs as test data (``onnx/backend/test/data/light/``) with every big weight a
ConstantOfShape fill (0.02 everywhere), which says nothing about numerics or ranking. :func:`randomized` writes the
same graph with seeded random weights of the same shapes (He-scaled, so 100-layer activations stay in range) and the
final Softmax dropped (random weights saturate the probabilities, which would hide any difference in the logits).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ZOO = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
MODELS = [
    "bvlc_alexnet",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "resnet50",
    "shufflenet",
    "squeezenet",
    "vgg19",
    "zfnet512",
]


def shipped(name: str) -> Path:
    """The file as the wheel ships it."""
    return ZOO / f"light_{name}.onnx"


def randomized(name: str, path: Path) -> Path:
    """The shipped graph with every weight (initializer or ConstantOfShape fill) seeded random, saved at ``path``."""
    model = onnx.load(str(shipped(name)))
    graph = model.graph
    rng = np.random.default_rng(0)
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weights: dict[str, tuple[int, ...]] = {}
    kept = []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            weights[node.output[0]] = tuple(int(d) for d in inits[node.input[0]])
        else:
            kept.append(node)
    for t in graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT:
            weights[t.name] = tuple(t.dims)
    role: dict[str, str] = {}
    for node in kept:
        if node.op_type == "BatchNormalization":
            role.update(zip(node.input[1:5], ["bn_scale", "bn_bias", "bn_mean", "bn_var"], strict=False))
        elif node.op_type in ("Conv", "Gemm"):
            role[node.input[1]] = "weight"
    values = {}
    for wname, shape in weights.items():
        kind = role.get(wname)
        if kind == "weight" and len(shape) >= 2:  # He scaling keeps 100-layer activations in range
            fan_in = math.prod(shape[1:]) if len(shape) > 2 else min(shape)
            v = rng.standard_normal(shape, dtype=np.float32)
            v *= np.float32(math.sqrt(2.0 / fan_in))
        elif kind in ("bn_scale", "bn_var"):
            v = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            v = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
        values[wname] = v
    if kept[-1].op_type == "Softmax" and kept[-1].output[0] == graph.output[0].name:
        logits, out = kept.pop().input[0], graph.output[0].name
        for node in kept:
            node.input[:] = [out if i == logits else i for i in node.input]
            node.output[:] = [out if o == logits else o for o in node.output]
    del graph.node[:]
    graph.node.extend(kept)
    ints = [t for t in graph.initializer if t.data_type != onnx.TensorProto.FLOAT and t.name not in weights]
    used = {i for n in kept for i in n.input}
    ints = [t for t in ints if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(ints + [numpy_helper.from_array(v, k) for k, v in values.items()])
    real_input = [i for i in graph.input if i.name not in inits]
    typed = {i.name: i for i in graph.input}
    del graph.input[:]
    graph.input.extend(real_input)
    for t in graph.initializer:  # IR 3: every initializer is also a graph input
        if t.name in typed:
            graph.input.append(typed[t.name])
        else:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
