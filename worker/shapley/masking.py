"""A model rewritten to evaluate many coalitions of neurons in one forward pass.

The graph is split in two:

* the **prefix**, every node that no mask can change, runs once per
  evaluation batch (B examples, or several batches side by side);
* the **suffix** takes the prefix's outputs (the *frontier*), repeats each
  batch once per coalition (``rows`` picks, for every row of the pass, the
  example it is), and multiplies each chosen layer's output by that
  coalition's mask.

So a pass over M coalitions on B examples costs the prefix once and the suffix
M·B rows: the cache of ESTIMATOR.md's "Cache the prefix".

Which tensors are "per example" is found by running the model at two batch
sizes, not assumed: a tensor whose first dimension follows the batch is
repeated per coalition; anything else computed from the input (a shape, a
batch statistic) is recomputed in the suffix from repeated tensors, so shape
arithmetic such as ``x.view(x.size(0), -1)`` sees the suffix's batch. A check
at build time compares the split model with the unsplit one and refuses a
model whose outputs differ.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx
from torch import nn

from .errors import DataError, ModelError
from .players import Layer, gate_site

__all__ = ["Gate", "MaskedModel", "build_masked_model", "probe", "record_sites"]


class Gate(nn.Module):
    """Keeps or removes each neuron of one layer, per coalition.

    ``masks`` is ``[M, n_players]`` (1 keep, 0 remove); the activation holds M
    coalitions' rows one after another. A removed neuron takes its ``fill``
    (per-channel mean activation) or zero.
    """

    fill: torch.Tensor | None  # a buffer (registered below), so that it moves with the module

    def __init__(self, layer: Layer, fill: torch.Tensor | None) -> None:
        super().__init__()
        self.offset, self.size, self.channel_dim = layer.offset, layer.size, layer.channel_dim
        self.register_buffer("fill", fill)

    def forward(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        m = masks[:, self.offset : self.offset + self.size]
        coalitions = masks.shape[0]
        xr = x.reshape(coalitions, -1, *x.shape[1:])
        shape = [1] * xr.ndim
        shape[self.channel_dim % x.ndim + 1] = self.size
        m = m.reshape(coalitions, *shape[1:])
        if self.fill is None:
            out = xr * m
        else:
            fill = self.fill.reshape(shape)
            out = fill + (xr - fill) * m
        return out.reshape(x.shape)


@dataclass
class MaskedModel:
    """The split model; ``prefix`` and ``suffix`` are plain GraphModules."""

    prefix: torch.fx.GraphModule
    suffix: torch.fx.GraphModule
    layers: list[Layer]

    @property
    def n_players(self) -> int:
        last = self.layers[-1]
        return last.offset + last.size

    def to(self, device: torch.device | str) -> MaskedModel:
        self.prefix.to(device)
        self.suffix.to(device)
        return self

    def run(self, frontier: tuple[torch.Tensor, ...], rows: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Outputs for ``masks.shape[0]`` coalitions; ``rows`` (``[M·B]``) indexes the frontier's examples."""
        return self.suffix(*frontier, rows, masks)

    def __call__(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Outputs ``[M·B, …]`` for coalitions ``masks`` (``[M, n_players]``) on one batch ``x``."""
        rows = torch.arange(x.shape[0], device=x.device).repeat(masks.shape[0])
        return self.run(self.prefix(x), rows, masks.to(x.dtype))


def record_sites(gm: torch.fx.GraphModule, layers: list[Layer], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each chosen layer's activation (after its BN/activation chain) on ``x``.

    Used to measure the ``mean`` fill once on the intact model.
    """
    sites = _sites(gm, layers)
    wanted = {node: layer.name for node, layer in sites.items()}
    recorder = _Recorder(gm, keep=set(wanted))
    recorder.run(x)
    return {wanted[node]: value for node, value in recorder.values.items()}


def build_masked_model(
    gm: torch.fx.GraphModule,
    layers: list[Layer],
    example: torch.Tensor,
    fills: dict[str, torch.Tensor] | None = None,
    cache_prefix: bool = True,
) -> MaskedModel:
    """Split ``gm`` into prefix and suffix with a gate after every chosen layer.

    ``example`` is a few real inputs; they are used to find the per-example
    tensors and to check the split model against the original.
    """
    graph = gm.graph
    (placeholder,) = _single_input(graph)
    out_node = _output_value(graph)
    sites = _sites(gm, layers)
    batched = _batched_nodes(gm, example)

    needed = _closure([out_node], lambda n: n.all_input_nodes)
    data = _closure([placeholder], lambda n: n.users) & needed
    if cache_prefix:
        gated = _closure([u for s in sites for u in s.users], lambda n: n.users) & needed
    else:
        gated = data - {placeholder}
    suffix = set(gated)
    grew = True
    while grew:  # recompute in the suffix whatever is derived from the data but not per example
        grew = False
        for node in list(suffix):
            for arg in node.all_input_nodes:
                if arg in data and arg not in suffix and arg not in batched and arg is not placeholder:
                    suffix.add(arg)
                    grew = True
    frontier = [
        n
        for n in graph.nodes
        if n in data and n not in suffix and (any(u in suffix for u in n.users) or (n in sites and n in needed))
    ]
    not_per_example = [n.name for n in frontier if n not in batched]
    if not_per_example:
        raise ModelError(
            f"The model computes {', '.join(not_per_example)} from the whole batch rather than per example, "
            "so neurons cannot be masked per coalition; export the model in eval mode (model.eval())."
        )

    attrs: dict[str, object] = {}
    prefix_graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    in_prefix = _closure(frontier, lambda n: n.all_input_nodes)
    for node in graph.nodes:
        if node in in_prefix:
            env[node] = prefix_graph.node_copy(node, lambda a: env[a])
            _keep_attr(gm, node, attrs)
    prefix_graph.output(tuple(env[n] for n in frontier))

    suffix_graph = torch.fx.Graph()
    senv: dict[torch.fx.Node, torch.fx.Node] = {}
    inputs = [suffix_graph.placeholder(f"frontier_{i}") for i in range(len(frontier))]
    rows = suffix_graph.placeholder("rows")
    masks = suffix_graph.placeholder("masks")
    gates: dict[torch.fx.Node, str] = {}
    for i, (node, layer) in enumerate(sites.items()):
        gates[node] = f"gate_{i}"
        attrs[gates[node]] = Gate(layer, None if fills is None else fills[layer.name])

    def gated_value(node: torch.fx.Node, value: torch.fx.Node) -> torch.fx.Node:
        return suffix_graph.call_module(gates[node], (value, masks)) if node in gates else value

    for node, value in zip(frontier, inputs, strict=True):
        senv[node] = gated_value(node, suffix_graph.call_function(torch.index_select, (value, 0, rows)))

    def lookup(arg: torch.fx.Node) -> torch.fx.Node:
        if arg not in senv:  # a constant (parameter or derived from one): copy it over
            senv[arg] = suffix_graph.node_copy(arg, lookup)
            _keep_attr(gm, arg, attrs)
        return senv[arg]

    for node in graph.nodes:
        if node in suffix:
            senv[node] = gated_value(node, suffix_graph.node_copy(node, lookup))
            _keep_attr(gm, node, attrs)
    suffix_graph.output(lookup(out_node))

    model = MaskedModel(
        prefix=torch.fx.GraphModule(attrs, prefix_graph, class_name="ShapleyPrefix"),
        suffix=torch.fx.GraphModule(attrs, suffix_graph, class_name="ShapleySuffix"),
        layers=layers,
    )
    _check_split(gm, model, example)
    return model


def _sites(gm: torch.fx.GraphModule, layers: list[Layer]) -> dict[torch.fx.Node, Layer]:
    by_name = {layer.name: layer for layer in layers}
    return {
        gate_site(node): by_name[node.meta["layer"]] for node in gm.graph.nodes if node.meta.get("layer") in by_name
    }


def _single_input(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ModelError(
            f"The model takes {len(inputs)} inputs ({', '.join(n.name for n in inputs)}); "
            "the estimator feeds it one tensor, the data's `inputs`. Wrap it so that it takes a single input."
        )
    return inputs


def _output_value(graph: torch.fx.Graph) -> torch.fx.Node:
    (value,) = [n for n in graph.nodes if n.op == "output"][0].args
    while isinstance(value, (tuple, list)):
        if len(value) != 1:
            raise ModelError(
                f"The model returns {len(value)} outputs; the metrics need one tensor of shape [batch, classes]. "
                "Wrap it so that it returns only the class scores."
            )
        (value,) = value
    if not isinstance(value, torch.fx.Node):
        raise ModelError("The model returns a constant, not a tensor computed from its input.")
    return value


def _closure(start: Iterable[torch.fx.Node], step) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    stack = list(start)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(step(node))
    return seen


def _keep_attr(gm: torch.fx.GraphModule, node: torch.fx.Node, attrs: dict[str, object]) -> None:
    if node.op in ("get_attr", "call_module"):
        target = cast(str, node.target)  # these two ops name an attribute by its dotted path
        obj: Any = gm
        for part in target.split("."):
            obj = getattr(obj, part)
        attrs[target] = obj


class _Recorder(torch.fx.Interpreter):
    """Runs the graph node by node, keeping shapes (all nodes) and values (some)."""

    def __init__(self, gm: torch.fx.GraphModule, keep: Set[torch.fx.Node] = frozenset()) -> None:
        super().__init__(gm)
        self.keep = keep
        self.shapes: dict[torch.fx.Node, torch.Size | None] = {}
        self.values: dict[torch.fx.Node, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node):
        result = super().run_node(n)
        self.shapes[n] = result.shape if isinstance(result, torch.Tensor) else None
        if n in self.keep:
            self.values[n] = result
        return result


def probe(gm: torch.fx.GraphModule, x: torch.Tensor) -> _Recorder:
    """Run ``gm`` on ``x`` recording every node's shape; a failure becomes a :class:`DataError`."""
    recorder = _Recorder(gm)
    try:
        with torch.inference_mode():
            recorder.run(x)
    except ModelError:  # the model says what it needs itself (onnx_import's checks of a fixed input size)
        raise
    except Exception as exc:  # the model's own error says what it expected
        raise DataError(
            f"The model failed on a batch of {x.shape[0]} inputs of shape {tuple(x.shape[1:])} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Make the data's `inputs` the shape the model expects, examples along the first dimension, "
            "and export the model with a dynamic batch dimension "
            "(torch.export: dynamic_shapes={'x': {0: torch.export.Dim('batch')}}; "
            "torch.onnx.export: dynamic_axes={'input': {0: 'batch'}})."
        ) from exc
    return recorder


def _batched_nodes(gm: torch.fx.GraphModule, example: torch.Tensor) -> set[torch.fx.Node]:
    """Nodes whose first dimension is the batch, found at two batch sizes."""
    probes = []
    for size in (2, 3):
        idx = torch.arange(size) % example.shape[0]
        probes.append((size, probe(gm, example[idx])))
    return {
        node
        for node in gm.graph.nodes
        if all(
            (shape := rec.shapes.get(node)) is not None and len(shape) > 0 and shape[0] == size for size, rec in probes
        )
    }


def _check_split(gm: torch.fx.GraphModule, model: MaskedModel, example: torch.Tensor) -> None:
    """All-ones masks must reproduce the original model, for two coalitions at once."""
    x = example[torch.arange(3) % example.shape[0]]
    with torch.inference_mode():
        expected = gm(x)
        while isinstance(expected, (tuple, list)):
            expected = expected[0]
        got = model(x, torch.ones(2, model.n_players, dtype=x.dtype))
    expected = expected.repeat(2, *[1] * (expected.ndim - 1))
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise ModelError(
            "With every neuron kept, the rewritten model does not reproduce the original's outputs; "
            "the model probably mixes examples of a batch (BatchNorm in training mode, a batch-wide reduction). "
            "Export it in eval mode (model.eval()) with examples independent of each other."
        )
