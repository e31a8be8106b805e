"""Convert an ONNX model into a ``torch.fx.GraphModule``.

The Shapley estimator treats every output channel of a conv and every output
unit of a linear layer as a player, and switches players off by rewriting the
model's FX graph so that a mask follows the layer.  Users often hand us ONNX
files, so those have to become FX graphs whose conv/linear layers are plain
``torch.nn.functional`` calls carrying the layer name the user knows from the
PyTorch model.

We do not use onnx2torch because it imports torchvision, which does not load
beside our torch wheel.  Building the graph by hand (rather than tracing a
module that interprets ONNX) also lets us decide what each node looks like:
weights become ``get_attr`` nodes, a ``Gemm``/``MatMul`` with a constant weight
becomes ``F.linear`` with the weight pre-transposed at load time, and shape
arithmetic stays in the graph so that the batch size is never baked in.
"""

from __future__ import annotations

import ast
import copy
import functools
import keyword
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, cast

import onnx
import onnx.checker
import onnx.external_data_helper
import onnx.helper
import onnx.numpy_helper
import onnx.shape_inference
import onnx.version_converter
import torch
import torch.fx
import torch.nn.functional as F

from worker.shapley.errors import DataError, ModelError

__all__ = ["TEMPORARIES", "onnx_to_graph_module"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
_MIN_OPSET = 11
# Older models are upgraded to this opset with onnx.version_converter, whose
# adapters up to 13 cover the ops of the ONNX Model Zoo's opset-9 networks.
_UPGRADE_OPSET = 13
_BATCH_PARAM = "__neuronshap_batch__"
_NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_REEXPORT_HINT = (
    "re-export the model with torch.onnx.export using standard ONNX operators, "
    "or upload a torch.export .pt2 archive instead"
)

_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}

# Layer ops are never evaluated at load time (their weights must stay
# buffers); Constant/Identity/Dropout already pass constants through.
_NEVER_FOLD = frozenset({"Conv", "Gemm", "MatMul", "Constant", "Identity", "Dropout"})
# Ops whose constant output is named after itself, not its (shape) input.
_SHAPE_FED = frozenset({"ConstantOfShape", "Shape", "Size", "Range"})
# Ops whose emitter binds every output itself (the others produce only their first).
_MULTI_OUTPUT = frozenset({"Split"})

# Functional ops indexed by the number of spatial dimensions.
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def onnx_to_graph_module(source: str | os.PathLike | bytes) -> torch.fx.GraphModule:
    """Load an ONNX model (path or serialized bytes) as an FX ``GraphModule``.

    The module takes the model's single input tensor and returns its single
    output tensor for any batch size.  Each conv and linear layer is one
    ``F.conv{1,2,3}d`` / ``F.linear`` node with ``meta["layer"]`` (a unique,
    user-recognisable name) and ``meta["layer_kind"]`` (``"conv"`` or
    ``"linear"``), so the estimator can find the players and insert masks.

    Raises ``ModelError`` for anything we cannot faithfully convert, with a
    message that says how to re-export the model, because a silently wrong
    graph would produce silently wrong Shapley values.
    """
    model, label = _load(source)
    _validate(model, label)
    # Every later step works on the graph without its large weights, which
    # go straight to the builder: onnx's tools serialize whatever they get.
    model, heavy = _weightless(model)
    weights = {t.name for t in heavy}
    _validate_io(model, label, weights)
    upgraded_from = None
    opset = _opset(model)
    if opset is not None and opset < _MIN_OPSET:
        model = _upgrade(model, label, opset)
        upgraded_from = opset
    _validate_ops(model, label)
    batch_reshapes, flatten_output = _free_batch(model, weights)
    # Value shapes at the declared input size (batch symbolic): where the graph fixes the spatial size.
    shapes = _inferred_dims(_shape_only_copy(model))
    gm = _Builder(model, heavy, shapes).build()
    gm.meta["onnx_opset"] = _opset(model)
    if upgraded_from is not None:
        gm.meta["onnx_upgraded_from_opset"] = upgraded_from
    gm.meta["onnx_batch_reshapes_rewritten"] = batch_reshapes
    # [N, C, 1, 1] class scores (SqueezeNet, DenseNet): loading.load_model
    # flattens them to [N, C]; this module keeps the file's output shape.
    gm.meta["onnx_output_unit_spatial"] = flatten_output
    return gm


# --------------------------------------------------------------------------
# Loading and validation: every refusal names the problem and the fix.


def _load(source: str | os.PathLike | bytes) -> tuple[onnx.ModelProto, str]:
    if isinstance(source, (bytes, bytearray)):
        label = "The uploaded model"
    else:
        label = f"The model file {os.fspath(source)!r}"
        if not os.path.isfile(source):
            raise ModelError(f"{label} does not exist; check the path.")
    try:
        if isinstance(source, (bytes, bytearray)):
            model = onnx.load_model_from_string(bytes(source))
        else:
            # External data is never read: we refuse it below with a fix, and
            # following paths named inside an uploaded file is unsafe.
            model = onnx.load(source, load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise ModelError(_not_onnx(label, f"it cannot be parsed: {exc}")) from exc
    # Random bytes sometimes decode as a valid but empty protobuf message.
    if not model.ir_version or not model.HasField("graph") or not model.graph.node:
        raise ModelError(_not_onnx(label, "it has no IR version or no graph nodes"))
    return model, label


def _not_onnx(label: str, why: str) -> str:
    return (
        f"{label} is not a valid ONNX model ({why}). It may be truncated or a "
        "different format; export it with torch.onnx.export(model, (example_input,), "
        "'model.onnx') and upload that file."
    )


def _validate(model: onnx.ModelProto, label: str) -> None:
    graph = model.graph
    tensors = list(graph.initializer) + [
        a.t for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR
    ]
    external = [t.name or "<constant>" for t in tensors if onnx.external_data_helper.uses_external_data(t)]
    if external:
        raise ModelError(
            f"{label} keeps {len(external)} weight tensor(s) in external data files "
            f"(e.g. {external[0]!r}), which are not uploaded with it. Load it with "
            "onnx.load(path) and re-save with onnx.save_model(model, 'model.onnx', "
            "save_as_external_data=False) so the weights are inside the file (or export "
            "with torch.onnx.export(..., external_data=False))."
        )

    custom = sorted({f"{n.domain}::{n.op_type}" for n in graph.node if n.domain not in _DEFAULT_DOMAINS})
    if custom:
        raise ModelError(
            f"{label} uses custom operators outside the standard ONNX domain: {', '.join(custom)}. "
            f"Either {_REEXPORT_HINT}, or replace those nodes in the ONNX file with standard operators "
            "(onnx.helper / onnxscript rewrite), e.g. by decomposing them into elementwise ops."
        )
    opset = _opset(model)
    if opset is None:
        raise ModelError(
            f"{label} imports no standard ONNX opset. Declare the one its nodes follow in the file "
            "(m = onnx.load('model.onnx'); m.opset_import.append(onnx.helper.make_opsetid('', 13)); "
            "onnx.save(m, 'model.onnx')), or re-export it with torch.onnx.export(..., opset_version=17)."
        )


def _validate_ops(model: onnx.ModelProto, label: str) -> None:
    graph = model.graph
    missing = sorted({n.op_type for n in graph.node if n.domain in _DEFAULT_DOMAINS and n.op_type not in _OPS})
    if missing:
        raise ModelError(
            f"{label} uses ONNX operators this converter does not support: {', '.join(missing)}. "
            "Rewrite those nodes in the ONNX file itself: onnx-simplifier (`onnxsim model.onnx out.onnx`) folds "
            "shape and constant subgraphs, and onnx.helper / onnxscript can replace a node by an equivalent "
            f"sequence of supported ones; or {_REEXPORT_HINT}."
        )


def _validate_io(model: onnx.ModelProto, label: str, weights: set[str]) -> None:
    graph = model.graph
    initializers = {t.name for t in graph.initializer} | weights
    inputs = [i.name for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelError(
            f"{label} has {len(inputs)} inputs ({', '.join(inputs) or 'none'}), but the "
            "estimator feeds exactly one tensor. If all but one are constants, make them initializers in the "
            "ONNX file (onnx.numpy_helper.from_array into graph.initializer, and remove them from graph.input); "
            "otherwise wrap the model so forward() takes a single tensor and re-export it."
        )
    if len(graph.output) != 1:
        raise ModelError(
            f"{label} has {len(graph.output)} outputs "
            f"({', '.join(o.name for o in graph.output)}), but the estimator scores "
            "exactly one. Keep only the class scores in the file (m = onnx.load('model.onnx'); keep = "
            "[o for o in m.graph.output if o.name == 'logits']; del m.graph.output[:]; m.graph.output.extend(keep); "
            "onnx.save(m, 'model.onnx'), with the scores' name for 'logits')."
        )

    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(_not_onnx(label, f"the ONNX checker rejects it: {exc}")) from exc


def _upgrade(model: onnx.ModelProto, label: str, opset: int) -> onnx.ModelProto:
    """Upgrade an old-opset model with onnx.version_converter (exact for the ops it adapts)."""
    try:
        upgraded = onnx.version_converter.convert_version(model, _UPGRADE_OPSET)
    except Exception as exc:  # the converter raises RuntimeError or its own C++ errors
        raise ModelError(
            f"{label} uses ONNX opset {opset}, older than the supported {_MIN_OPSET}, and upgrading it with "
            f'onnx.version_converter failed: {exc}. Upgrade the file yourself (python -c "import onnx, '
            f"onnx.version_converter as vc; onnx.save(vc.convert_version(onnx.load('model.onnx'), "
            f"{_UPGRADE_OPSET}), 'model_opset{_UPGRADE_OPSET}.onnx')\"), replacing the node the error names if "
            f"it has no adapter, or re-export with torch.onnx.export(..., opset_version=17)."
        ) from exc
    return upgraded


def _free_batch(model: onnx.ModelProto, weights: set[str]) -> tuple[int, bool]:
    """Make a batch dimension fixed at 1 symbolic; say whether the output needs flattening.

    Old exporters (Caffe2, the ONNX Model Zoo) fix the batch at 1 and write
    ``Reshape(x, [1, C])`` before the classifier.  The input's leading 1 is
    replaced by a symbolic dimension and ONNX shape inference follows it; a
    Reshape whose constant target starts with 1 while its data's first
    dimension is that symbol gets 0 there ("copy the input's dimension"),
    which is exact: with the batch of 1 both shapes agree, and reshaping
    example by example is what the file does.  Nothing else is rewritten,
    since only these Reshapes are provably about the batch.  Rewrites are
    made in place on ``model``; returns how many and whether the output is
    ``[N, C, 1, ...]`` (class scores behind trailing unit dimensions).
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    (real_input,) = [i for i in graph.input if i.name not in initializers and i.name not in weights]
    dims = real_input.type.tensor_type.shape.dim
    # Only a batch the file fixes at 1 is freed: where it is already symbolic,
    # a Reshape to [1, ...] is the author's choice (and mixes examples).
    fixed_at_one = bool(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == 1
    if fixed_at_one:
        dims[0].dim_param = _BATCH_PARAM
    light = _shape_only_copy(model)
    rewritten = 0
    for _ in range(len(graph.node) + 1 if fixed_at_one else 0):
        shapes = _inferred_dims(light)
        changed = False
        for node, light_node in zip(graph.node, light.graph.node, strict=True):
            if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in initializers:
                continue
            target = onnx.numpy_helper.to_array(initializers[node.input[1]])
            data = shapes.get(node.input[0])
            allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
            if target.ndim != 1 or not len(target) or target[0] != 1 or not data or data[0] != _BATCH_PARAM:
                continue
            new = target.copy()
            if not allowzero:
                new[0] = 0
            elif -1 not in target.tolist():
                new[0] = -1
            else:
                continue
            name = _fresh_name(f"{node.input[1]}_batch", initializers.keys() | weights)
            tensor = onnx.numpy_helper.from_array(new, name)
            initializers[name] = tensor
            graph.initializer.append(tensor)
            light.graph.initializer.append(tensor)
            node.input[1] = light_node.input[1] = name
            rewritten += 1
            changed = True
        if not changed:
            break
    declared = [d.dim_value or None for d in graph.output[0].type.tensor_type.shape.dim]
    out = _inferred_dims(light).get(graph.output[0].name) or declared
    flatten = bool(out) and len(out) == 4 and out[2:] == [1, 1]
    return rewritten, flatten


def _weightless(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """A copy without the large float weights (typed graph inputs instead), and those weights.

    onnx's checker, version converter and shape inference serialize the whole
    model; without its weights they take milliseconds instead of seconds.
    Small and integer tensors (shapes, axes) stay, since those tools read them.
    """
    graph = model.graph
    light = onnx.ModelProto()
    light.ir_version, light.producer_name, light.producer_version = (
        model.ir_version,
        model.producer_name,
        model.producer_version,
    )
    light.domain, light.model_version, light.doc_string = model.domain, model.model_version, model.doc_string
    light.opset_import.extend(model.opset_import)
    light.metadata_props.extend(model.metadata_props)
    light.functions.extend(model.functions)
    g = light.graph
    g.name, g.doc_string = graph.name, graph.doc_string
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    inputs = {i.name for i in graph.input}
    heavy = []
    for t in graph.initializer:
        if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) or math.prod(t.dims) <= 1024:
            g.initializer.append(t)
            continue
        heavy.append(t)
        if t.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light, heavy


def _shape_only_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its large weights and recorded shapes, for cheap shape inference."""
    light, _ = _weightless(model)
    # Shapes the exporter recorded hold the fixed batch; infer them afresh.
    del light.graph.value_info[:]
    for o in light.graph.output:
        o.type.tensor_type.ClearField("shape")
    return light


def _inferred_dims(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Each value's dims as ints, symbol names, or None where unknown."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is a help here, never a reason to refuse a model
        return {}
    out: dict[str, list[int | str | None]] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            out[vi.name] = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim
            ]
    return out


def _fresh_name(base: str, taken: Any) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def _opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), None)


# --------------------------------------------------------------------------
# Graph building.


class _Builder:
    """Walks the ONNX nodes in order and emits FX nodes for each."""

    def __init__(
        self,
        model: onnx.ModelProto,
        weights: Sequence[onnx.TensorProto] = (),
        shapes: dict[str, list[int | str | None]] | None = None,
    ) -> None:
        self.onnx_graph = model.graph
        self.shapes = shapes or {}
        opset = _opset(model)
        assert opset is not None, "_validate refuses a model without a default-domain opset"
        self.opset = opset
        self.root = torch.nn.Module()
        self.graph = torch.fx.Graph()
        self.env: dict[str, torch.fx.Node] = {}
        # Values known at load time (initializers, Constant outputs).  Ops read
        # shapes, axes and pads from here; they become buffers only when used.
        self.consts: dict[str, torch.Tensor] = {t.name: _to_tensor(t) for t in [*model.graph.initializer, *weights]}
        self.initializers = set(self.consts)
        # For a constant computed at load time (a Reshape of a weight, a
        # ConstantOfShape fill), the name of the weight it came from.
        self.origin: dict[str, str] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers[name].append(node)
            self.producer.update((name, node) for name in node.output)
        self.graph_outputs = {o.name for o in model.graph.output}
        self.skipped: set[str] = set()  # first outputs of nodes folded into another
        self.index = 0

    def build(self) -> torch.fx.GraphModule:
        (name,) = [i.name for i in self.onnx_graph.input if i.name not in self.initializers]
        self.env[name] = self.graph.placeholder(self._identifier(name))
        for index, node in enumerate(self.onnx_graph.node):
            if node.output[0] in self.skipped:
                continue
            self.index = index
            self._check_extra_outputs(node)
            if self._fold(node):
                continue
            result = _OPS[node.op_type](self, node)
            if result is not None:
                self.env[node.output[0]] = result
        # The ONNX values each FX node computes, in graph order (several where an Identity or a folded bias Add
        # binds a value to the same node): where worker.shapley.onnx_export gates a neuron in the file itself.
        for node in self.onnx_graph.node:
            for out in node.output:
                if out in self.env:
                    self.env[out].meta.setdefault("onnx_values", []).append(out)
        self.graph.output(self.value(self.onnx_graph.output[0].name))
        _strip_device_prefix(self.graph)
        _make_layer_names_unique(self.graph)
        gm = torch.fx.GraphModule(self.root, self.graph, class_name="OnnxGraphModule")
        gm.graph.lint()
        gm.recompile()
        return gm.eval()

    def _fold(self, node: onnx.NodeProto) -> bool:
        """Evaluate a node whose inputs are all load-time constants, at load time.

        So a weight stored behind a Reshape/Transpose/Unsqueeze (or filled by
        ConstantOfShape) is still a constant weight, and its Conv/Gemm still
        a layer.  Layer ops themselves are never folded.
        """
        if node.op_type in _NEVER_FOLD or node.op_type in _MULTI_OUTPUT or not node.input:
            return False
        if not all(name in self.consts for name in node.input if name):
            return False
        scratch = copy.copy(self)
        scratch.graph, scratch.root, scratch.env, scratch.skipped = torch.fx.Graph(), torch.nn.Module(), {}, set()
        try:
            result = _OPS[node.op_type](scratch, node)
            if result is None:
                return False
            scratch.graph.output(result)
            value = torch.fx.Interpreter(scratch.root, graph=scratch.graph).run()
        except ModelError:
            raise
        except Exception:  # leave it to run time, where it fails (or not) as in the file
            return False
        if not isinstance(value, torch.Tensor):
            return False
        self.consts[node.output[0]] = value
        source = node.output[0] if node.op_type in _SHAPE_FED else node.input[0]
        self.origin[node.output[0]] = self.origin.get(source, source)
        return True

    def _check_extra_outputs(self, node: onnx.NodeProto) -> None:
        # Every emitter produces only the first output (BatchNorm running
        # stats, Dropout mask and MaxPool indices are training/debug outputs).
        if node.op_type in _MULTI_OUTPUT:
            return
        for name in node.output[1:]:
            if name and (self.consumers[name] or name in self.graph_outputs):
                raise ModelError(
                    f"{_describe(node)} uses its optional output {name!r}, which this converter "
                    "does not support (a training output). Remove its uses from the ONNX file with onnx.helper "
                    "(an eval-mode export has none)."
                )

    # -- values ----------------------------------------------------------

    def value(self, name: str) -> torch.fx.Node:
        """FX node for an ONNX value; constants become buffers on first use."""
        if name not in self.env:
            if name not in self.consts:
                raise ModelError(
                    f"ONNX value {name!r} is used before any node produces it: the file's nodes are not in "
                    "topological order. Sort them (onnx-simplifier: `onnxsim model.onnx sorted.onnx`), or re-export."
                )
            self.env[name] = self.buffer(self.consts[name], name)
        return self.env[name]

    def optional(self, node: onnx.NodeProto, i: int) -> torch.fx.Node | None:
        return self.value(node.input[i]) if _has_input(node, i) else None

    def const(self, node: onnx.NodeProto, i: int) -> torch.Tensor | None:
        """The load-time value of input ``i``, or None if absent or computed."""
        return self.consts.get(node.input[i]) if _has_input(node, i) else None

    def const_or_value(self, node: onnx.NodeProto, i: int) -> list[int] | torch.fx.Node | None:
        """An integer list input as a list when known at load time, else its graph value (None if absent)."""
        if not _has_input(node, i):
            return None
        tensor = self.consts.get(node.input[i])
        if tensor is None:
            return self.value(node.input[i])
        return [int(v) for v in tensor.reshape(-1).tolist()]

    def const_ints(self, node: onnx.NodeProto, i: int, what: str) -> list[int] | None:
        """Integer list input (axes, pads...) that must be known at load time."""
        if not _has_input(node, i):
            return None
        tensor = self.consts.get(node.input[i])
        if tensor is None:
            raise ModelError(
                f"{_describe(node)} computes its {what} at run time; only "
                f"constant {what} are supported. Fold them into constants in the ONNX file: onnx-simplifier "
                f"(`onnxsim model.onnx out.onnx`) evaluates such shape subgraphs."
            )
        return [int(v) for v in tensor.reshape(-1).tolist()]

    def buffer(self, tensor: torch.Tensor, hint: str) -> torch.fx.Node:
        name = self._identifier(hint)
        self.root.register_buffer(name, tensor)
        return self.graph.get_attr(name)

    def _identifier(self, hint: str) -> str:
        """A Python identifier that clashes with no buffer or Module attribute."""
        base = re.sub(r"\W", "_", hint).strip("_") or "value"
        if base[0].isdigit():
            base = f"v_{base}"
        name, k = base, 0
        while keyword.iskeyword(name) or hasattr(self.root, name):
            k += 1
            name = f"{base}_{k}"
        return name

    # -- fixed sizes -----------------------------------------------------

    def size_check(self, node: onnx.NodeProto, target: tuple[int, ...] | None) -> _SizeCheck | None:
        """Values per example that a Flatten/Reshape must get for the graph to work, and the error otherwise.

        Data at another spatial size than the file declares reaches the first
        construct that fixes it here: a layer with a fixed number of input
        features after the Flatten/Reshape, or a Reshape to a constant
        per-example shape.  Without a check the layer fails with torch's
        "mat1 and mat2 shapes cannot be multiplied" (or a Reshape silently
        moves values between examples), neither of which says what to do.
        """
        layer = next((c for c in self.consumers[node.output[0]] if _fixed_in_features(self, c) is not None), None)
        out = self.shapes.get(node.output[0]) or []
        flat = _attrs(node).get("axis", 1) == 1 if node.op_type == "Flatten" else len(out) == 2
        expected: int | None = None
        if layer is not None and flat:  # x.flatten(1) or x.view(x.size(0), -1) into a linear layer
            expected = _fixed_in_features(self, layer)
        elif target is not None and _batch_first(target):  # a constant per-example shape
            data = self.shapes.get(node.input[0])
            rest = data[1:] if data else None
            # Only where the file's own size gives one example at a time (else it is the author's choice).
            if (
                rest
                and all(isinstance(d, int) for d in rest)
                and math.prod(cast(list[int], rest)) == math.prod(target[1:])
            ):
                expected = math.prod(target[1:])
        if expected is None:
            return None
        return expected, self._size_message(node, layer, expected)

    def _size_message(self, node: onnx.NodeProto, layer: onnx.NodeProto | None, expected: int) -> tuple[str, str]:
        (declared,) = [i for i in self.onnx_graph.input if i.name not in self.initializers]
        dims = [d.dim_value if d.HasField("dim_value") else None for d in declared.type.tensor_type.shape.dim][1:]
        if layer is not None:
            where = f"{_describe(node)} before layer {self._layer_name(layer)!r}"
        elif (upstream := self._upstream(node, ("Conv", "Gemm", "MatMul"))) is not None:
            where = f"{_describe(node)} after layer {self._layer_name(upstream)!r}"
        else:
            where = _describe(node)
        if dims and all(dims):
            needs = f", which inputs of {'×'.join(map(str, dims))} (the size the ONNX file declares) give,"
            fix = f"Resize (or crop) the data to {'×'.join(map(str, dims[1:]))}, the input size the ONNX file declares"
        else:
            needs, fix = "", "Resize the data to the size the model was made for"
        pool = self._fixed_pool_before(node)
        if pool is not None:
            fix += (
                f", or, to accept any size, replace {_describe(pool)} (a fixed window covering the whole feature map "
                f"at the declared size) by Global{pool.op_type} in the ONNX file with onnx.helper"
            )
        return (
            f"{where} needs {expected} values per example{needs} but this data gives it ",
            f": the graph fixes the spatial size there. {fix}.",
        )

    def _fixed_pool_before(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        """The AveragePool/MaxPool upstream of ``node`` whose fixed window makes a 1×1 map at the declared size."""
        up = self._upstream(node, ("AveragePool", "MaxPool", "Conv", "Gemm", "MatMul"))
        if up is None or up.op_type not in ("AveragePool", "MaxPool"):
            return None
        out = self.shapes.get(up.output[0])
        return up if out and len(out) > 2 and all(d == 1 for d in out[2:]) else None

    def _upstream(self, node: onnx.NodeProto, ops: tuple[str, ...]) -> onnx.NodeProto | None:
        """The first node of one of ``ops`` on the path of first inputs above ``node``."""
        while node.input and (up := self.producer.get(node.input[0])) is not None:
            if up.op_type in ops:
                return up
            node = up
        return None

    # -- emission --------------------------------------------------------

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.fx.Node:
        return self.graph.call_function(fn, args, kwargs)

    def mark_layer(self, fx_node: torch.fx.Node, node: onnx.NodeProto, kind: str) -> None:
        fx_node.meta["layer"] = self._layer_name(node)
        fx_node.meta["layer_kind"] = kind

    def _layer_name(self, node: onnx.NodeProto) -> str:
        """The name the user knows from the PyTorch model, best source first.

        (a) the weight's name less its weight suffix: ``<module>.weight``
        (dynamo and legacy exporters keep parameter names), Caffe2's
        ``fire9/expand3x3_w_0`` (the ONNX Model Zoo), ``fc_w``, ``fc_weight``;
        for a weight computed at load time (a Reshape of a weight, a
        ConstantOfShape fill) the weight it came from; a ``gpu_0/`` device
        scope shared by every layer is then dropped; (b) the node's torch name-scope
        metadata (dynamo); (c) a ``/scope/.../Op`` node name (legacy, which
        renames weights it constant-folds, e.g. conv+BN); (d) the node name;
        (e) op type and position.
        """
        weight = self.origin.get(node.input[1], node.input[1]) if node.input[1] in self.consts else None
        if weight and (stem := _weight_stem(weight)):
            return stem
        scopes = next((p.value for p in node.metadata_props if p.key == _NAME_SCOPES_KEY), None)
        if scopes:
            try:
                parsed = ast.literal_eval(scopes)
            except (ValueError, SyntaxError):
                parsed = None
            if isinstance(parsed, list) and (name := _join_scopes([str(s) for s in parsed[:-1]])):
                return name
        if node.name.startswith("/") and (name := _join_scopes(node.name.split("/")[:-1])):
            return name
        return node.name or f"{node.op_type.lower()}_{self.index}"


def _fixed_in_features(b: _Builder, node: onnx.NodeProto) -> int | None:
    """The input features of a Gemm/MatMul whose weight is a load-time constant (a linear layer), else None."""
    if node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2:
        return None
    w = b.consts.get(node.input[1])
    if w is None or w.dim() != 2:
        return None
    a = _attrs(node) if node.op_type == "Gemm" else {}
    if a.get("transA", 0):
        return None
    return int(w.shape[1] if a.get("transB", 0) else w.shape[0])


def _batch_first(target: tuple[int, ...] | None) -> bool:
    """A constant Reshape target that keeps the batch first (0: copy it; -1: what is left) and fixes the rest."""
    return target is not None and len(target) > 0 and target[0] in (0, -1) and all(t > 0 for t in target[1:])


# Suffixes that mark a tensor as a layer's weight; the rest is the layer's
# name: `conv1.weight` (torch), `fire9/expand3x3_w_0` (Caffe2), `fc_w`, `fc_weight`.
_WEIGHT_SUFFIXES = (".weight", "_weight", "_w_0", "_W_0", "_w", "_W")
_DEVICE_PREFIX = re.compile(r"^(?:gpu|cpu|cuda|device)_?\d+/")


def _weight_stem(name: str) -> str | None:
    for suffix in _WEIGHT_SUFFIXES:
        if name.endswith(suffix) and (stem := name[: -len(suffix)].rstrip("./")):
            return stem
    return None


def _strip_device_prefix(graph: torch.fx.Graph) -> None:
    """Drop a Caffe2 device scope (``gpu_0/``) that every layer name shares.

    Users type ``res2_0_branch2a``, not ``gpu_0/res2_0_branch2a``; the prefix
    says where the model was trained, not which layer it is.
    """
    layers = [n for n in graph.nodes if "layer" in n.meta]
    if not layers or not (match := _DEVICE_PREFIX.match(layers[0].meta["layer"])):
        return
    prefix = match.group(0)
    if all(n.meta["layer"].startswith(prefix) and len(n.meta["layer"]) > len(prefix) for n in layers):
        for n in layers:
            n.meta["layer"] = n.meta["layer"][len(prefix) :]


def _join_scopes(scopes: Sequence[str]) -> str:
    """Qualified module name from a scope path.

    Exporters mix relative (``conv1``) and qualified (``layer1.0``) scope
    entries: dynamo writes ``['', 'layer1', 'layer1.0', 'layer1.0.conv1',
    'conv2d']``, the legacy exporter names a node
    ``/layer1/layer1.0/downsample/downsample.0/Conv``, qualifying a
    container's children by the container's own (possibly relative) name.
    PyTorch child names never contain dots, so an entry with a dot extends
    the part of the current name that ends with what precedes its last dot;
    an entry without one is a child of the current name.
    """
    name = ""
    for scope in filter(None, scopes):
        head, _, tail = scope.rpartition(".")
        if not name or scope.startswith(name + "."):
            name = scope
        elif head and (name == head or name.endswith("." + head)):
            name = f"{name}.{tail}"
        else:
            name = f"{name}.{scope}"
    return name


def _make_layer_names_unique(graph: torch.fx.Graph) -> None:
    """Suffix repeated layer names with ``_1``, ``_2``...

    Players are addressed by layer name, so two layers sharing one would be
    indistinguishable.  It happens when a module is called twice (shared
    weights) or when an exporter scopes two ops alike.  The first occurrence
    keeps its name so the common case reads like the PyTorch model.
    """
    layers = [n for n in graph.nodes if "layer" in n.meta]
    taken = {n.meta["layer"] for n in layers}
    seen: set[str] = set()
    for n in layers:
        base = n.meta["layer"]
        if base in seen:
            k = 1
            while f"{base}_{k}" in taken:
                k += 1
            n.meta["layer"] = f"{base}_{k}"
            taken.add(n.meta["layer"])
        seen.add(base)


def _describe(node: onnx.NodeProto) -> str:
    """How error messages point at a node, so the user can find it in Netron."""
    return f"{node.op_type} node {node.name!r}" if node.name else f"An unnamed {node.op_type} node"


def _has_input(node: onnx.NodeProto, i: int) -> bool:
    return len(node.input) > i and node.input[i] != ""


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _to_tensor(proto: onnx.TensorProto) -> torch.Tensor:
    if proto.data_type not in _DTYPES:
        raise ModelError(
            f"Tensor {proto.name!r} has ONNX data type "
            f"{onnx.TensorProto.DataType.Name(proto.data_type)}, which is not supported; "
            "convert it to float32 in the ONNX file (onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t)"
            ".astype('float32'), t.name)), or re-export the model in float32."
        )
    return torch.from_numpy(onnx.numpy_helper.to_array(proto).copy())


# --------------------------------------------------------------------------
# Run-time helpers: called from the generated code where the ONNX semantics
# depend on the input's shape or rank, which is only known at run time.

# ONNX Pad modes and F.pad's names for them.
_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}

# ("explicit", F.pad list) or ("same", kernel, strides, dilations, lower):
# padding torch cannot express, applied by ``_pad_spatial`` before the op.
_PadSpec = tuple


def _shape(x: torch.Tensor, start: int, end: int | None) -> torch.Tensor:
    return torch.tensor(x.shape[start:end], dtype=torch.int64, device=x.device)


# (values per example, (message before, message after the data's size)): see _Builder.size_check.
_SizeCheck = tuple[int, tuple[str, str]]


def _check_size(x: torch.Tensor, check: _SizeCheck | None) -> None:
    if check is not None and math.prod(x.shape[1:]) != check[0]:
        (before, after) = check[1]
        # The data's fault as much as the graph's: the message offers a fix on either.
        raise DataError(f"{before}{'×'.join(map(str, x.shape[1:]))} = {math.prod(x.shape[1:])} values{after}")


def _reshape(
    x: torch.Tensor, shape: torch.Tensor | tuple[int, ...], allowzero: int, check: _SizeCheck | None = None
) -> torch.Tensor:
    _check_size(x, check)
    dims = shape.tolist() if isinstance(shape, torch.Tensor) else list(shape)
    if not allowzero:  # ONNX: 0 copies the input's dimension at that position
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _flatten(x: torch.Tensor, axis: int, check: _SizeCheck | None = None) -> torch.Tensor:
    _check_size(x, check)
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _transpose(x: torch.Tensor, perm: tuple[int, ...] | None) -> torch.Tensor:
    return x.permute(perm if perm is not None else tuple(reversed(range(x.dim()))))


def _unsqueeze(x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    rank = x.dim() + len(axes)  # negative axes count from the output's end
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def _gather(data: torch.Tensor, indices: torch.Tensor, axis: int) -> torch.Tensor:
    axis %= data.dim()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    picked = data.index_select(axis, indices.reshape(-1))
    return picked.reshape(data.shape[:axis] + indices.shape + data.shape[axis + 1 :])


def _ints(v: torch.Tensor | list[int]) -> list[int]:
    """A shape, axes or bounds argument known at load time (a list) or computed in the graph (a tensor)."""
    return [int(i) for i in v.reshape(-1).tolist()] if isinstance(v, torch.Tensor) else list(v)


def _slice(
    x: torch.Tensor,
    starts: torch.Tensor | list[int],
    ends: torch.Tensor | list[int],
    axes: torch.Tensor | list[int] | None,
    steps: torch.Tensor | list[int] | None,
) -> torch.Tensor:
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    out = x
    # Lists from the model file: a malformed one keeps its shortest reading, as before (no ValueError here).
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=False):
        axis %= x.dim()
        if step > 0:
            out = out[(slice(None),) * axis + (slice(start, end, step),)]
            continue
        # torch slices only forwards; ONNX clamps a backward slice's start to [0, dim-1], its end to [-1, dim-1].
        dim = out.shape[axis]
        start = min(max(start + dim if start < 0 else start, 0), dim - 1)
        end = min(max(end + dim if end < 0 else end, -1), dim - 1)
        out = out.index_select(axis, torch.arange(start, end, step, device=x.device))
    return out


def _constant_of_shape(shape: torch.Tensor, value: float | int | bool, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(tuple(int(d) for d in shape.tolist()), value, dtype=dtype, device=shape.device)


def _sum(*xs: torch.Tensor) -> torch.Tensor:
    return functools.reduce(torch.add, xs)


def _max(*xs: torch.Tensor) -> torch.Tensor:
    return functools.reduce(torch.maximum, xs)


def _min(*xs: torch.Tensor) -> torch.Tensor:
    return functools.reduce(torch.minimum, xs)


def _mean(*xs: torch.Tensor) -> torch.Tensor:
    return _sum(*xs) / len(xs)


def _hard_sigmoid(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return torch.clamp(alpha * x + beta, 0.0, 1.0)


def _split_part(x: torch.Tensor, axis: int, sizes: torch.Tensor | list[int] | None, parts: int, i: int) -> torch.Tensor:
    """Part ``i`` of ONNX Split: the given sizes, or ``parts`` equal ones (the last smaller if need be)."""
    if sizes is None:
        chunk = -(-x.shape[axis] // parts)
        lengths = [chunk] * (parts - 1) + [x.shape[axis] - chunk * (parts - 1)]
    else:
        lengths = _ints(sizes)
    return x.narrow(axis, sum(lengths[:i]), lengths[i])


def _layer_norm(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, axis: int, eps: float) -> torch.Tensor:
    """ONNX LayerNormalization: normalize over the dimensions from ``axis`` on; scale and bias broadcast."""
    shape = x.shape[axis % x.dim() :]
    if scale.shape == shape and (bias is None or bias.shape == shape):
        return F.layer_norm(x, shape, scale, bias, eps)
    out = F.layer_norm(x, shape, None, None, eps) * scale
    return out if bias is None else out + bias


def _resize(
    x: torch.Tensor,
    scales: list[float] | None,
    sizes: torch.Tensor | list[int] | None,
    mode: str,
    align_corners: bool | None,
    pytorch_half_pixel: bool,
) -> torch.Tensor:
    """ONNX Resize of the spatial dimensions, by F.interpolate (see ``_RESIZE_MODES``)."""
    spatial = x.dim() - 2
    if mode == "linear":
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[spatial]
    if sizes is not None:
        size = _ints(sizes)
        if size[:2] != list(x.shape[:2]):
            raise ModelError(f"A Resize to {size} changes the batch or channel dimension; resize only spatial ones.")
        out = size[2:]
        kwargs: dict[str, Any] = {"size": out}
    else:
        if scales is None or scales[:2] != [1.0, 1.0]:
            raise ModelError(f"A Resize by scales {scales} changes the batch or channel dimension.")
        out = [math.floor(n * s) for n, s in zip(x.shape[2:], scales[2:], strict=True)]
        kwargs = {"scale_factor": scales[2:]}
    if mode == "nearest-whole":
        if any(o % n for o, n in zip(out, x.shape[2:], strict=True)):
            raise ModelError(
                f"A nearest Resize from {list(x.shape[2:])} to {out} with the default coordinate_transformation_mode "
                "(half_pixel) and nearest_mode (round_prefer_floor) is torch's only for a whole-number factor; set "
                "nearest_mode to round_prefer_ceil in the ONNX file (onnx.helper) if that is what the model means."
            )
        mode = "nearest"
    if pytorch_half_pixel and 1 in out and mode != "nearest-exact":
        # ONNX samples coordinate 0 for a length-1 output; torch samples the middle.
        raise ModelError(
            "A Resize with coordinate_transformation_mode=pytorch_half_pixel to a length-1 dimension has no "
            "torch equivalent; set the mode to align_corners in the ONNX file, which samples the same pixel."
        )
    return F.interpolate(x, mode=mode, align_corners=align_corners, **kwargs)


def _expand(x: torch.Tensor, shape: torch.Tensor | list[int]) -> torch.Tensor:
    # ONNX Expand broadcasts both ways: a 1 in `shape` keeps x's dimension.
    return x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(shape))))


def _tile(x: torch.Tensor, repeats: torch.Tensor | list[int]) -> torch.Tensor:
    return x.repeat(_ints(repeats))


def _lrn(x: torch.Tensor, size: int, alpha: float, beta: float, bias: float) -> torch.Tensor:
    """ONNX LRN: x / (bias + alpha/size * sum of x^2 over a channel window)^beta.

    The window of channel c is [c - floor((size-1)/2), c + ceil((size-1)/2)],
    clipped to the channels there are.  torch's local_response_norm centres an
    even window the other way, so this is written out.
    """
    n, c = x.shape[:2]
    squares = (x * x).reshape(n, 1, c, -1)
    padded = F.pad(squares, (0, 0, (size - 1) // 2, size // 2))
    window_sum = F.avg_pool2d(padded, (size, 1), stride=1) * size
    return x / (bias + (alpha / size) * window_sum.reshape(x.shape)) ** beta


# Emitters that compute several per-example temporaries inside one graph node, as multiples of the node's output
# that are alive at its peak besides the output: the activation estimate (game.py) counts a node's output only.
# _lrn measured 4.1x its output at its peak (ZFNet-512's first LRN on 64 examples), the output included.
TEMPORARIES: dict[object, int] = {_lrn: 3}


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates


def _gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, alpha: float, beta: float) -> torch.Tensor:
    y = alpha * (a @ b)
    return y if c is None else y + beta * c


def _coerced_softmax(x: torch.Tensor, axis: int, log: bool) -> torch.Tensor:
    # Before opset 13 (Log)Softmax flattens the input to 2-D at `axis`.
    flat = _flatten(x, axis)
    return (F.log_softmax if log else F.softmax)(flat, dim=1).reshape(x.shape)


def _global_pool(x: torch.Tensor, reduce: str) -> torch.Tensor:
    return getattr(x, reduce)(dim=tuple(range(2, x.dim())), keepdim=True)


def _pad(x: torch.Tensor, pads: list[int], value: float, axes: list[int] | None, mode: str) -> torch.Tensor:
    rank = x.dim()
    axes = list(range(rank)) if axes is None else [a % rank for a in axes]
    n = len(axes)
    # `pads` comes from the model file: a malformed one keeps its shortest reading, as before.
    begin, end = dict(zip(axes, pads[:n], strict=False)), dict(zip(axes, pads[n:], strict=False))
    torch_pads = []  # F.pad lists (begin, end) from the last dimension backwards
    for d in reversed(range(rank)):
        torch_pads += [begin.get(d, 0), end.get(d, 0)]
    if mode == "constant":
        return F.pad(x, torch_pads, value=value)
    # torch pads a border copy only on trailing dimensions, leaving the first two alone.
    keep = 2 * (rank - 2)
    if any(torch_pads[keep:]):
        raise ModelError(f"A {mode} Pad of the batch or channel dimension is not supported; pad only spatial ones.")
    return F.pad(x, torch_pads[:keep], mode=mode)


def _pad_spatial(x: torch.Tensor, spec: _PadSpec, value: float) -> torch.Tensor:
    """Pad spatial dims per a spec from ``_padding``.

    auto_pad=SAME needs the input size, which is why this runs in the graph.
    """
    if spec[0] == "explicit":
        return F.pad(x, spec[1], value=value)
    _, kernel, strides, dilations, lower = spec
    torch_pads: list[int] = []
    # The attributes come from the model file and may disagree with the input's rank: shortest wins, as before.
    for size, k, s, d in reversed(list(zip(x.shape[2:], kernel, strides, dilations, strict=False))):
        total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        torch_pads += [big, small] if lower else [small, big]
    return F.pad(x, torch_pads, value=value)


def _avg_pool_excluding_pad(
    x: torch.Tensor, spec: _PadSpec, kernel: tuple, strides: tuple, ceil_mode: bool
) -> torch.Tensor:
    # torch cannot exclude padding it did not add itself; dividing the pooled
    # input by the pooled "is real data" mask gives sum / real-element count.
    pool = _AVG_POOL[len(kernel)]
    ones = torch.ones_like(x[:1, :1])
    num = pool(_pad_spatial(x, spec, 0.0), kernel, strides, 0, ceil_mode)
    den = pool(_pad_spatial(ones, spec, 0.0), kernel, strides, 0, ceil_mode)
    return num / den


# --------------------------------------------------------------------------
# Op emitters: each takes the builder and an ONNX node and returns the FX
# node for the node's first output (or None when it only records a constant).

_Emitter = Callable[[_Builder, onnx.NodeProto], "torch.fx.Node | None"]


def _padding(
    node: onnx.NodeProto,
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    torch_limit: bool,
) -> tuple[tuple[int, ...], _PadSpec | None]:
    """Split ONNX padding into torch's symmetric ``padding`` and a pre-pad spec.

    torch convolutions and pools only pad symmetrically (pools at most half
    the kernel, ``torch_limit``), so asymmetric pads and auto_pad=SAME come
    back as a spec for ``_pad_spatial`` to apply before the op, with zero
    ``padding``.
    """
    rank = len(kernel)
    a = _attrs(node)
    auto_pad = a.get("auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return (0,) * rank, None
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return (0,) * rank, (
            "same",
            tuple(kernel),
            tuple(strides),
            tuple(dilations),
            auto_pad == "SAME_LOWER",
        )
    pads = list(a.get("pads", [0] * 2 * rank))
    begin, end = pads[:rank], pads[rank:]
    # `pads` comes from the model file; a short one is read as far as it goes, as before.
    if begin == end and (not torch_limit or all(p <= k // 2 for p, k in zip(begin, kernel, strict=False))):
        return tuple(begin), None
    torch_pads: list[int] = []
    for d in reversed(range(rank)):
        torch_pads += [begin[d], end[d]]
    return (0,) * rank, ("explicit", tuple(torch_pads))


def _conv(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
    a = _attrs(node)
    weight = b.const(node, 1)
    if "kernel_shape" in a:
        kernel = list(a["kernel_shape"])
    elif weight is not None:
        kernel = list(weight.shape[2:])
    else:
        raise ModelError(
            f"{_describe(node)} has neither kernel_shape nor a constant weight. Fold its weight into an "
            "initializer (`onnxsim model.onnx out.onnx`) or set kernel_shape on the node with onnx.helper."
        )
    rank = len(kernel)
    strides, dilations = a.get("strides", [1] * rank), a.get("dilations", [1] * rank)
    x = b.value(node.input[0])
    padding, spec = _padding(node, kernel, strides, dilations, torch_limit=False)
    if spec is not None:
        x = b.call(_pad_spatial, x, spec, 0.0)
    out = b.call(
        _CONV[rank],
        x,
        b.value(node.input[1]),
        b.optional(node, 2),
        tuple(strides),
        padding,
        tuple(dilations),
        a.get("group", 1),
    )
    b.mark_layer(out, node, "conv")
    return out


def _pool(kind: str) -> _Emitter:
    def emit(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
        a = _attrs(node)
        kernel = tuple(a["kernel_shape"])
        rank = len(kernel)
        strides = tuple(a.get("strides", [1] * rank))
        dilations = tuple(a.get("dilations", [1] * rank))
        ceil_mode = bool(a.get("ceil_mode", 0))
        x = b.value(node.input[0])
        padding, spec = _padding(node, kernel, strides, dilations, torch_limit=True)
        if kind == "max":
            if spec is not None:
                x = b.call(_pad_spatial, x, spec, float("-inf"))
            return b.call(_MAX_POOL[rank], x, kernel, strides, padding, dilations, ceil_mode)
        if any(d != 1 for d in dilations):
            raise ModelError(
                f"{_describe(node)} uses dilations, which torch's avg_pool lacks. Replace it in the ONNX file "
                "(onnx.helper) by a depthwise Conv (group = channels) with the same kernel, strides, pads and "
                "dilations and a constant weight of 1/(kernel size)."
            )
        include_pad = bool(a.get("count_include_pad", 0))
        if spec is None:
            return b.call(_AVG_POOL[rank], x, kernel, strides, padding, ceil_mode, include_pad)
        if include_pad:  # zero padding that counts towards the divisor
            return b.call(_AVG_POOL[rank], b.call(_pad_spatial, x, spec, 0.0), kernel, strides, 0, ceil_mode)
        return b.call(_avg_pool_excluding_pad, x, spec, kernel, strides, ceil_mode)

    return emit


def _gemm_op(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
    a = _attrs(node)
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    x = b.value(node.input[0])
    if a.get("transA", 0):
        x = b.graph.call_method("t", (x,))
    w = b.const(node, 1)
    trans_b = a.get("transB", 0)
    if w is None:  # a computed B is plain arithmetic, not a layer
        w_node = b.value(node.input[1])
        if trans_b:
            w_node = b.graph.call_method("t", (w_node,))
        return b.call(_gemm, x, w_node, b.optional(node, 2), alpha, beta)
    if trans_b and alpha == 1.0:  # already F.linear's [out, in] layout
        weight = b.value(node.input[1])
    else:
        weight = b.buffer((alpha * (w if trans_b else w.t())).contiguous(), f"{node.input[1]}_linear")
    out_features = w.shape[0] if trans_b else w.shape[1]
    c = b.const(node, 2)
    if c is not None and (c.dim() <= 1 or c.shape[0] == 1):  # C broadcasts as a bias
        bias = torch.broadcast_to((beta * c).reshape(-1), (out_features,)).clone()
        out = b.call(F.linear, x, weight, b.buffer(bias, node.input[2]))
        b.mark_layer(out, node, "linear")
        return out
    out = b.call(F.linear, x, weight, None)
    b.mark_layer(out, node, "linear")
    if not _has_input(node, 2):
        return out
    # A per-row or computed C is added after the layer.
    return b.call(torch.add, out, b.value(node.input[2]), alpha=beta)


def _matmul(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
    w = b.const(node, 1)
    x = b.value(node.input[0])
    if w is None or w.dim() != 2:
        return b.call(torch.matmul, x, b.value(node.input[1]))
    bias, add = _foldable_bias(b, node, w.shape[1])
    out = b.call(F.linear, x, b.buffer(w.t().contiguous(), f"{node.input[1]}_linear"), bias)
    b.mark_layer(out, node, "linear")
    if add is not None:
        b.skipped.add(add.output[0])
        b.env[add.output[0]] = out
    return out


def _foldable_bias(
    b: _Builder, node: onnx.NodeProto, out_features: int
) -> tuple[torch.fx.Node | None, onnx.NodeProto | None]:
    """The constant 1-D bias of an ``Add`` that is the MatMul's only consumer.

    Exporters write ``nn.Linear`` on a >2-D input as MatMul + Add; folding the
    Add makes it a single linear layer, like the PyTorch module it came from.
    """
    out = node.output[0]
    users = b.consumers[out]
    if len(users) != 1 or users[0].op_type != "Add" or out in b.graph_outputs:
        return None, None
    add = users[0]
    other = [name for name in add.input if name != out]
    bias = b.consts.get(other[0]) if len(other) == 1 else None
    if bias is None or bias.dim() != 1 or bias.shape[0] != out_features:
        return None, None
    return b.value(other[0]), add


def _batch_norm(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
    a = _attrs(node)
    if a.get("training_mode", 0):
        raise ModelError(f"{_describe(node)} is in training mode; export the model after model.eval().")
    x, scale, bias, mean, var = (b.value(n) for n in node.input[:5])
    return b.call(F.batch_norm, x, mean, var, scale, bias, False, 0.0, float(a.get("epsilon", 1e-5)))


def _softmax(log: bool) -> _Emitter:
    def emit(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
        x = b.value(node.input[0])
        if b.opset < 13:
            return b.call(_coerced_softmax, x, _attrs(node).get("axis", 1), log)
        return b.call(F.log_softmax if log else F.softmax, x, dim=_attrs(node).get("axis", -1))

    return emit


def _transpose_op(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
    perm = _attrs(node).get("perm")  # default: reverse all dimensions
    return b.call(_transpose, b.value(node.input[0]), tuple(perm) if perm else None)


def _reshape_op(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
    shape = b.const(node, 1)
    constant = tuple(int(v) for v in shape.tolist()) if shape is not None else None
    allowzero = _attrs(node).get("allowzero", 0)
    # With allowzero a leading 0 is a real zero, not "copy the batch".
    check = b.size_check(node, constant if not (allowzero and constant and constant[0] == 0) else None)
    target = constant if constant is not None else b.value(node.input[1])
    return b.call(_reshape, b.value(node.input[0]), target, allowzero, check)


def _flatten_op(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
    return b.call(_flatten, b.value(node.input[0]), _attrs(node).get("axis", 1), b.size_check(node, None))


def _axes(b: _Builder, node: onnx.NodeProto) -> list[int] | None:
    """Axes from the attribute (older opsets) or the second input (newer)."""
    a = _attrs(node)
    return list(a["axes"]) if "axes" in a else b.const_ints(node, 1, "axes")


def _squeeze(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
    axes = _axes(b, node)
    x = b.value(node.input[0])
    return b.call(torch.squeeze, x) if axes is None else b.call(torch.squeeze, x, tuple(axes))


def _unsqueeze_op(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
    axes = _axes(b, node)
    assert axes is not None, "the ONNX checker (in _validate) requires Unsqueeze's axes"
    return b.call(_unsqueeze, b.value(node.input[0]), tuple(axes))


def _reduce(fn: Callable[..., torch.Tensor]) -> _Emitter:
    def emit(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
        a = _attrs(node)
        axes = _axes(b, node)
        x = b.value(node.input[0])
        if not axes and a.get("noop_with_empty_axes", 0):
            return x
        return b.call(fn, x, dim=tuple(axes) if axes else None, keepdim=bool(a.get("keepdims", 1)))

    return emit


def _pad_op(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
    a = _attrs(node)
    mode = a.get("mode", "constant")
    if mode not in _PAD_MODES:
        raise ModelError(
            f"{_describe(node)} uses padding mode {mode!r}; supported are {', '.join(_PAD_MODES)}. Replace it in "
            "the ONNX file (onnx.helper) by a constant Pad, or by Slice and Concat nodes that copy the border."
        )
    pads = list(a["pads"]) if "pads" in a else b.const_ints(node, 1, "pads")
    fill = b.const(node, 2)
    value = float(fill.item()) if fill is not None else float(a.get("value", 0.0))
    axes = b.const_ints(node, 3, "axes")
    return b.call(_pad, b.value(node.input[0]), pads, value, axes, _PAD_MODES[mode])


def _clip(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
    a = _attrs(node)
    bounds: list[float | torch.fx.Node | None] = []  # a constant, a value computed in the graph, or no bound
    for i, key in ((1, "min"), (2, "max")):  # inputs since opset 11, attributes before
        c = b.const(node, i)
        if c is not None:
            bounds.append(c.item())
        else:
            bounds.append(b.optional(node, i) if _has_input(node, i) else a.get(key))
    x = b.value(node.input[0])
    if bounds == [None, None]:
        return x
    lo, hi = bounds
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo < hi:
        # ReLU6 and Hardtanh: one op the mask moves past, so a removed neuron stays silent.
        return b.call(F.hardtanh, x, float(lo), float(hi))
    return b.call(torch.clamp, x, *bounds)


def _slice_op(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
    # torch.chunk exports (legacy) compute starts and ends from Shape: those stay graph values.
    bounds = [b.const_or_value(node, i) for i in range(1, 5)]
    return b.call(_slice, b.value(node.input[0]), *bounds)


def _constant(b: _Builder, node: onnx.NodeProto) -> None:
    a = _attrs(node)
    if "value" in a:
        tensor = _to_tensor(a["value"])
    elif "value_float" in a or "value_int" in a:
        tensor = torch.tensor(a.get("value_float", a.get("value_int")))
    elif "value_floats" in a or "value_ints" in a:
        tensor = torch.tensor(a.get("value_floats", a.get("value_ints")))
    else:
        raise ModelError(
            f"{_describe(node)} holds a {', '.join(a)} value, which is not supported; replace it in the ONNX file "
            "by a Constant with a dense tensor value (onnx.helper.make_tensor)."
        )
    b.consts[node.output[0]] = tensor


def _identity(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node | None:
    # Keep constants constant so e.g. a tied weight behind Identity still
    # makes its MatMul a linear layer.
    if node.input[0] in b.consts:
        b.consts[node.output[0]] = b.consts[node.input[0]]
        b.origin[node.output[0]] = b.origin.get(node.input[0], node.input[0])
        return None
    return b.value(node.input[0])


def _simple(fn: Callable[..., Any], n_inputs: int = 1, **attr_defaults: Any) -> _Emitter:
    """Emitter for ops that map onto one torch call plus keyword attributes.

    ``attr_defaults`` maps torch keyword -> (onnx attribute, ONNX default).
    """

    def emit(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
        a = _attrs(node)
        kwargs = {kw: a.get(attr, default) for kw, (attr, default) in attr_defaults.items()}
        return b.call(fn, *(b.value(n) for n in node.input[:n_inputs]), **kwargs)

    return emit


def _constant_of_shape_op(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
    value = _attrs(node).get("value")
    fill = _to_tensor(value) if value is not None else torch.zeros(1)
    return b.call(_constant_of_shape, b.value(node.input[0]), fill.reshape(-1)[0].item(), fill.dtype)


def _lrn_op(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
    a = _attrs(node)
    return b.call(
        _lrn,
        b.value(node.input[0]),
        int(a["size"]),
        float(a.get("alpha", 1e-4)),
        float(a.get("beta", 0.75)),
        float(a.get("bias", 1.0)),
    )


def _hard_sigmoid_op(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
    a = _attrs(node)
    alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
    x = b.value(node.input[0])
    if math.isclose(alpha, 1 / 6, rel_tol=1e-6) and beta == 0.5:  # torch's nn.Hardsigmoid
        return b.call(F.hardsigmoid, x)
    return b.call(_hard_sigmoid, x, alpha, beta)


def _split_op(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
    """Each output is one narrow() of the input, so the graph holds tensors only (no tuple)."""
    a = _attrs(node)
    sizes: list[int] | torch.fx.Node | None = list(a["split"]) if "split" in a else b.const_or_value(node, 1)
    x = b.value(node.input[0])
    for i, name in enumerate(node.output):
        if name:
            b.env[name] = b.call(_split_part, x, a.get("axis", 0), sizes, len(node.output), i)
    return b.env[node.output[0]]


def _layer_norm_op(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
    a = _attrs(node)
    return b.call(
        _layer_norm,
        b.value(node.input[0]),
        b.value(node.input[1]),
        b.optional(node, 2),
        a.get("axis", -1),
        float(a.get("epsilon", 1e-5)),
    )


# ONNX Resize (mode, coordinate_transformation_mode, nearest_mode) and the torch interpolation
# that computes the same source coordinates; torch's exports write these.
_RESIZE_MODES = {
    ("nearest", "asymmetric", "floor"): ("nearest", None),
    ("nearest", "half_pixel", "round_prefer_ceil"): ("nearest-exact", None),
    # ONNX's defaults (and what onnx.version_converter makes of an opset-9 Upsample): torch's nearest
    # for whole-number upscaling factors only, checked at run time.
    ("nearest", "half_pixel", "round_prefer_floor"): ("nearest-whole", None),
    ("nearest", "pytorch_half_pixel", "round_prefer_ceil"): ("nearest-exact", None),
    ("linear", "half_pixel", None): ("linear", False),
    ("linear", "pytorch_half_pixel", None): ("linear", False),
    ("linear", "align_corners", None): ("linear", True),
}


def _resize_op(b: _Builder, node: onnx.NodeProto) -> torch.fx.Node:
    a = _attrs(node)
    mode = a.get("mode", "nearest")
    transform = a.get("coordinate_transformation_mode", "half_pixel")
    rounding = a.get("nearest_mode", "round_prefer_floor") if mode == "nearest" else None
    unsupported = [
        f"{k}={a[k]}" for k, ok in (("antialias", 0), ("axes", None), ("exclude_outside", 0)) if a.get(k, ok) != ok
    ]
    if a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        unsupported.append(f"keep_aspect_ratio_policy={a['keep_aspect_ratio_policy']}")
    if (mode, transform, rounding) not in _RESIZE_MODES or unsupported:
        combination = ", ".join([f"mode={mode}", f"coordinate_transformation_mode={transform}"] + unsupported)
        raise ModelError(
            f"{_describe(node)} resizes with {combination}"
            + (f", nearest_mode={rounding}" if rounding else "")
            + ", which has no exact torch equivalent. Supported: nearest with asymmetric/floor, "
            "half_pixel/round_prefer_ceil or (for whole-number upscaling) half_pixel/round_prefer_floor, and "
            "linear with half_pixel, pytorch_half_pixel or align_corners (what torch.onnx.export writes for "
            "nn.Upsample and F.interpolate). Change the node's attributes in the ONNX file with onnx.helper "
            "if one of those is what the model means."
        )
    torch_mode, align_corners = _RESIZE_MODES[(mode, transform, rounding)]
    scales = b.const(node, 2)
    sizes = b.const_or_value(node, 3)
    return b.call(
        _resize,
        b.value(node.input[0]),
        None if scales is None or not scales.numel() else [float(v) for v in scales.tolist()],
        None if sizes == [] else sizes,
        torch_mode,
        align_corners,
        transform == "pytorch_half_pixel",
    )


def _nary(fn: Callable[..., torch.Tensor]) -> _Emitter:
    return lambda b, n: b.call(fn, *(b.value(i) for i in n.input if i))


_OPS: dict[str, _Emitter] = {
    "Conv": _conv,
    "Gemm": _gemm_op,
    "MatMul": _matmul,
    "Add": _simple(torch.add, 2),
    "Sum": _nary(_sum),
    "Max": _nary(_max),
    "Min": _nary(_min),
    "Mean": _nary(_mean),
    "ConstantOfShape": _constant_of_shape_op,
    "LRN": _lrn_op,
    "Sub": _simple(torch.sub, 2),
    "Mul": _simple(torch.mul, 2),
    "Div": _simple(_div, 2),
    "Pow": _simple(torch.pow, 2),
    "Relu": _simple(torch.relu),
    "LeakyRelu": _simple(F.leaky_relu, negative_slope=("alpha", 0.01)),
    "Sigmoid": _simple(torch.sigmoid),
    "HardSigmoid": _hard_sigmoid_op,
    "HardSwish": _simple(F.hardswish),
    "Tanh": _simple(torch.tanh),
    "Elu": _simple(F.elu, alpha=("alpha", 1.0)),
    "Gelu": _simple(F.gelu, approximate=("approximate", "none")),
    "Sqrt": _simple(torch.sqrt),
    "Exp": _simple(torch.exp),
    "Log": _simple(torch.log),
    "Neg": _simple(torch.neg),
    "Erf": _simple(torch.erf),
    "Softmax": _softmax(log=False),
    "LogSoftmax": _softmax(log=True),
    "BatchNormalization": _batch_norm,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda b, n: b.call(_global_pool, b.value(n.input[0]), "mean"),
    "GlobalMaxPool": lambda b, n: b.call(_global_pool, b.value(n.input[0]), "amax"),
    "Flatten": _flatten_op,
    "Reshape": _reshape_op,
    "Transpose": _transpose_op,
    "Concat": lambda b, n: b.call(torch.cat, [b.value(i) for i in n.input], dim=_attrs(n)["axis"]),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze_op,
    "Slice": _slice_op,
    "Dropout": _identity,
    "Identity": _identity,
    "Constant": _constant,
    "Shape": lambda b, n: b.call(_shape, b.value(n.input[0]), _attrs(n).get("start", 0), _attrs(n).get("end")),
    "Gather": lambda b, n: b.call(_gather, b.value(n.input[0]), b.value(n.input[1]), _attrs(n).get("axis", 0)),
    "Cast": lambda b, n: b.graph.call_method("to", (b.value(n.input[0]), _cast_dtype(n))),
    "Clip": _clip,
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "Pad": _pad_op,
    "Split": _split_op,
    "LayerNormalization": _layer_norm_op,
    "Einsum": lambda b, n: b.call(torch.einsum, _attrs(n)["equation"], *(b.value(i) for i in n.input)),
    "Resize": _resize_op,
    "Where": _simple(torch.where, 3),
    "Equal": _simple(torch.eq, 2),
    "Expand": lambda b, n: b.call(_expand, b.value(n.input[0]), b.const_or_value(n, 1)),
    "Tile": lambda b, n: b.call(_tile, b.value(n.input[0]), b.const_or_value(n, 1)),
}


def _cast_dtype(node: onnx.NodeProto) -> torch.dtype:
    to = _attrs(node)["to"]
    if to not in _DTYPES:
        raise ModelError(
            f"{_describe(node)} casts to {onnx.TensorProto.DataType.Name(to)}, which is not supported; make it "
            "cast to FLOAT in the ONNX file (onnx.helper: set the node's `to` attribute to TensorProto.FLOAT)."
        )
    return _DTYPES[to]
