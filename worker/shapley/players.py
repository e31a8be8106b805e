"""The players of the game: the neurons of the layers the user chose.

A *layer* is a conv or linear node of the graph (or several nodes sharing one
weight); its neurons are its output channels. Players of all chosen layers are
numbered consecutively, layer by layer in graph order, so a coalition is one
boolean vector.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx

from .errors import SpecError
from .graph_ops import CHAIN_TARGETS, GETITEM, TUPLE_CHAIN_TARGETS

__all__ = ["Layer", "find_layers", "select_layers", "gate_site"]


@dataclass(frozen=True)
class Layer:
    """One chosen layer and where its neurons sit in the player vector."""

    name: str
    kind: str  # "conv" (channel dim 1) or "linear" (channel dim -1)
    size: int
    offset: int = 0
    produces_output: bool = False

    @property
    def channel_dim(self) -> int:
        return 1 if self.kind == "conv" else -1


def find_layers(gm: torch.fx.GraphModule) -> list[Layer]:
    """Every conv/linear layer of the graph, in graph order, without offsets."""
    output_layers = _layers_feeding_output(gm)
    layers: dict[str, Layer] = {}
    for node in gm.graph.nodes:
        name = node.meta.get("layer")
        if name is None or name in layers:
            continue
        weight = _fetch(gm, node.args[1])
        layers[name] = Layer(
            name=name,
            kind=node.meta["layer_kind"],
            size=int(weight.shape[0]),
            produces_output=name in output_layers,
        )
    return list(layers.values())


def select_layers(layers: list[Layer], patterns: list[str] | None) -> list[Layer]:
    """Pick layers by name or glob and number their neurons.

    With no patterns, every layer except the ones producing the output: the
    output layer's units are the classes themselves, and removing one only
    says "this class can no longer be predicted".
    """
    if not layers:
        raise SpecError("The model has no convolution or linear layer, so it has no neurons to rank.")
    if patterns:
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(layer.name, p) for layer in layers)]
        if unmatched:
            raise SpecError(
                f"Layer pattern(s) {', '.join(map(repr, unmatched))} match no layer of the model; "
                f"its conv/linear layers are: {', '.join(layer.name for layer in layers)}."
            )
        chosen = [layer for layer in layers if any(fnmatch.fnmatchcase(layer.name, p) for p in patterns)]
    else:
        chosen = [layer for layer in layers if not layer.produces_output]
        if not chosen:
            raise SpecError(
                "The model's only conv/linear layers produce its output; name the layers to rank explicitly "
                f"(available: {', '.join(layer.name for layer in layers)})."
            )
    numbered, offset = [], 0
    for layer in chosen:
        numbered.append(Layer(layer.name, layer.kind, layer.size, offset, layer.produces_output))
        offset += layer.size
    return numbered


def gate_site(node: torch.fx.Node) -> torch.fx.Node:
    """The node after which the neurons of ``node`` are masked.

    Follows the chain of BatchNorm / activation ops that only this node feeds,
    so a removed neuron is silent downstream (ESTIMATOR.md, "Removing a neuron").
    """
    current = node
    while len(current.users) == 1:
        (user,) = current.users
        if user.op != "call_function" or user.target not in CHAIN_TARGETS or user.args[0] is not current:
            break
        if user.target in TUPLE_CHAIN_TARGETS:
            (item,) = user.users if len(user.users) == 1 else (None,)
            if item is None or item.target is not GETITEM or item.args[1] != 0:
                break
            user = item
        current = user
    return current


def _layers_feeding_output(gm: torch.fx.GraphModule) -> set[str]:
    """Layers whose output reaches the model output without passing another layer."""
    found: set[str] = set()
    seen: set[torch.fx.Node] = set()
    stack = [n for n in gm.graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if "layer" in node.meta:
            found.add(node.meta["layer"])
            continue
        stack.extend(node.all_input_nodes)
    return found


def _fetch(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        raise SpecError(f"Layer node {node} has a weight that is not a stored parameter; it cannot be ranked.")
    obj: Any = gm
    for part in cast(str, node.target).split("."):  # a get_attr node's target is the attribute's dotted path
        obj = getattr(obj, part)
    return obj
