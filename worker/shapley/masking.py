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

import time
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx
from torch import nn

from .errors import DataError, ModelError, UserInputError
from .players import Layer, gate_site

__all__ = [
    "BuildTimeout",
    "deadline_check",
    "Gate",
    "MaskedModel",
    "Probes",
    "build_masked_model",
    "close",
    "probe",
    "probe_batches",
    "run_checked",
    "site_means",
]


class BuildTimeout(Exception):
    """The deadline of a game's build passed: raised between two nodes of one of its runs."""


def deadline_check(deadline: float | None) -> Callable[[], None] | None:
    """What the build's runs call between nodes: raises :class:`BuildTimeout` once ``time.monotonic()`` passes
    ``deadline``; ``None`` (no checks) without one. Between nodes, because one run of a big model's checks takes
    seconds, and a build takes several."""
    if deadline is None:
        return None

    def check() -> None:
        if time.monotonic() >= deadline:
            raise BuildTimeout(f"the deadline passed {time.monotonic() - deadline:.1f} s ago")

    return check


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


def site_means(
    gm: torch.fx.GraphModule,
    layers: list[Layer],
    inputs: torch.Tensor,
    chunk: int,
    check: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Each chosen layer's per-channel mean activation (after its BN/activation chain) over ``inputs``: the
    ``mean`` fill, measured once on the intact model.

    One pass over the data, ``chunk`` examples at a time; each site's sum is taken as its value is computed and
    the value dropped, so a pass holds one chunk's activations, not every layer's at once.
    """
    sites = _sites(gm, layers)
    sums: dict[torch.fx.Node, torch.Tensor] = {}
    counts: dict[torch.fx.Node, int] = {}

    def add(node: torch.fx.Node, a: torch.Tensor) -> None:
        channel = sites[node].channel_dim % a.ndim
        total = a.double().sum([d for d in range(a.ndim) if d != channel])
        sums[node] = sums[node] + total if node in sums else total
        counts[node] = counts.get(node, 0) + a.numel() // a.shape[channel]

    with torch.inference_mode():
        for start in range(0, inputs.shape[0], chunk):
            _Recorder(gm, on_value=add, keep=set(sites), check=check).run(inputs[start : start + chunk])
    return {sites[node].name: (total / counts[node]).float() for node, total in sums.items()}


@dataclass
class Probes:
    """The model run node by node at two batch sizes (2 and 3 examples): which tensors follow the batch, every
    tensor's shape, and the intact outputs the split model is checked against. Run once per game: on VGG-19 each
    example costs 20 GFLOP, so every check reuses these rather than run the model again."""

    two: _Recorder
    three: _Recorder
    x2: torch.Tensor
    x3: torch.Tensor
    out2: Any
    out3: Any


def probe_batches(gm: torch.fx.GraphModule, example: torch.Tensor, check: Callable[[], None] | None = None) -> Probes:
    """:func:`probe` at 2 and 3 examples of ``example`` (repeated when it has fewer)."""
    x2, x3 = (example[torch.arange(size) % example.shape[0]] for size in (2, 3))
    two, three = probe(gm, x2, check), probe(gm, x3, check)
    return Probes(two, three, x2, x3, two.result, three.result)


def build_masked_model(
    gm: torch.fx.GraphModule,
    layers: list[Layer],
    example: torch.Tensor,
    fills: dict[str, torch.Tensor] | None = None,
    cache_prefix: bool = True,
    probes: Probes | None = None,
    check: Callable[[], None] | None = None,
) -> MaskedModel:
    """Split ``gm`` into prefix and suffix with a gate after every chosen layer.

    ``example`` is a few real inputs; they are used to find the per-example
    tensors and to check the split model against the original (``probes``: runs of them already made).
    ``check`` is called between the nodes of every run, to stop a build past its deadline.
    """
    graph = gm.graph
    (placeholder,) = _single_input(graph)
    out_node = _output_value(graph)
    sites = _sites(gm, layers)
    probes = probes or probe_batches(gm, example, check)
    batched = _batched_nodes(gm, probes)

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
    _check_split(model, probes, check)
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
    """Runs the graph node by node, keeping shapes (all nodes), values (``keep``) or handing them to ``on_value``,
    and calling ``check`` before each node (it raises to stop a run past a deadline)."""

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        keep: Set[torch.fx.Node] = frozenset(),
        on_value: Callable[[torch.fx.Node, torch.Tensor], None] | None = None,
        check: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(gm)
        # A model's own error reaches the user as the model wrote it, without fx's node dump appended.
        self.extra_traceback = False
        self.keep, self.on_value, self.check = keep, on_value, check
        self.shapes: dict[torch.fx.Node, torch.Size | None] = {}
        self.values: dict[torch.fx.Node, torch.Tensor] = {}
        self.result: Any = None
        self.current: torch.fx.Node | None = None  # the node running (after a failure: the one that failed)

    def run(self, *args, **kwargs):
        self.result = super().run(*args, **kwargs)
        return self.result

    def run_node(self, n: torch.fx.Node):
        if self.check is not None:
            self.check()
        self.current = n
        result = super().run_node(n)
        self.shapes[n] = result.shape if isinstance(result, torch.Tensor) else None
        if n in self.keep:
            if self.on_value is not None:
                self.on_value(n, result)
            else:
                self.values[n] = result
        return result


def run_checked(gm: torch.fx.GraphModule, *args: Any, check: Callable[[], None] | None = None) -> Any:
    """``gm(*args)`` node by node, calling ``check`` between nodes (for a build's runs, which a deadline stops)."""
    return _Recorder(gm, check=check).run(*args)


def probe(gm: torch.fx.GraphModule, x: torch.Tensor, check: Callable[[], None] | None = None) -> _Recorder:
    """Run ``gm`` on ``x`` recording every node's shape; a failure becomes a :class:`DataError`."""
    recorder = _Recorder(gm, check=check)
    try:
        with torch.inference_mode():
            recorder.run(x)
    except BuildTimeout:
        raise
    except UserInputError:  # the model says what it needs itself (onnx_import's checks of a fixed input size)
        raise
    except Exception as exc:  # the model's own error says what it expected
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        where = _where(recorder)
        larger = _smallest_larger_size(gm, x, check) if x.ndim == 4 else None
        if larger is not None:
            raise DataError(
                f"The model fails on images of {x.shape[2]}x{x.shape[3]}{where} ({error}): they are smaller than "
                f"this graph's pooling windows and strides allow. The smallest square size it takes (of "
                f"{', '.join(map(str, _SIZES))}) is {larger}x{larger}: resize the images in the data's `inputs` to "
                "at least that, or to the size the model was trained at."
            ) from exc
        raise DataError(
            f"The model failed on a batch of {x.shape[0]} inputs of shape {tuple(x.shape[1:])}{where} ({error}). "
            "Make the data's `inputs` the shape the model expects, examples along the first dimension, "
            "and export the model with a dynamic batch dimension "
            "(torch.export: dynamic_shapes={'x': {0: torch.export.Dim('batch')}}; "
            "torch.onnx.export: dynamic_axes={'input': {0: 'batch'}})."
        ) from exc
    return recorder


# Square image sizes tried when a model fails on small images: the common sizes networks are trained at.
_SIZES = (32, 64, 96, 112, 128, 160, 192, 224, 256, 299, 320, 384, 512)


def _where(recorder: _Recorder) -> str:
    """`` at layer L (node n)`` for the node a run failed in, or nothing when it failed before any."""
    n = recorder.current
    if n is None:
        return ""
    layer = n.meta.get("layer")
    return f" at layer {layer} (node {n.name})" if layer else f" at node {n.name}"


def _smallest_larger_size(gm: torch.fx.GraphModule, x: torch.Tensor, check: Callable[[], None] | None) -> int | None:
    """The smallest of :data:`_SIZES` above ``x``'s spatial size, up to four times it, at which the model runs on
    two images of ``x``'s channels, or None (then the failure was probably not the images' size). Only on the
    error path, and bounded: a graph that fails for another reason (a batch fixed deep inside) is run at a few
    sizes, none much larger than the data's."""
    current = max(x.shape[2], x.shape[3])
    for size in (s for s in _SIZES if current < s <= max(64, 4 * current)):
        try:
            with torch.inference_mode():
                _Recorder(gm, check=check).run(torch.zeros(2, x.shape[1], size, size, dtype=x.dtype))
            return size
        except BuildTimeout:
            raise
        except Exception:  # not yet large enough, or another problem
            continue
    return None


def _batched_nodes(gm: torch.fx.GraphModule, probes: Probes) -> set[torch.fx.Node]:
    """Nodes whose first dimension is the batch, found at two batch sizes."""
    runs = ((2, probes.two), (3, probes.three))
    return {
        node
        for node in gm.graph.nodes
        if all(
            (shape := rec.shapes.get(node)) is not None and len(shape) > 0 and shape[0] == size for size, rec in runs
        )
    }


def close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to float32 rounding: another batch size picks other kernels, whose sums round differently, and that
    error scales with the outputs' magnitude (logits of ~70 on VGG-19 with random weights differ by ~1e-4), so the
    absolute tolerance does too; a model that mixes examples differs by far more."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * max(1.0, scale))


def _check_split(model: MaskedModel, probes: Probes, check: Callable[[], None] | None) -> None:
    """All-ones masks must reproduce the original model (its probed outputs), for two coalitions at once."""
    x, expected = probes.x2, probes.out2
    while isinstance(expected, (tuple, list)):
        expected = expected[0]
    with torch.inference_mode():
        rows = torch.arange(x.shape[0]).repeat(2)
        frontier = run_checked(model.prefix, x, check=check)
        got = run_checked(model.suffix, *frontier, rows, torch.ones(2, model.n_players, dtype=x.dtype), check=check)
    expected = expected.repeat(2, *[1] * (expected.ndim - 1))
    if got.shape != expected.shape or not close(got, expected):
        raise ModelError(
            "With every neuron kept, the rewritten model does not reproduce the original's outputs; "
            "the model probably mixes examples of a batch (BatchNorm in training mode, a batch-wide reduction). "
            "Export it in eval mode (model.eval()) with examples independent of each other."
        )
