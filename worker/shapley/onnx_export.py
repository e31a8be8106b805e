"""The edited model as an ONNX file: the removed neurons removed exactly where and as the game removes them.

An edit (:mod:`worker.shapley.editing`) is measured on the game's masked
model; a user wants a model file that does the same anywhere. The gate sits
where the game's does, after the BatchNorm/activation chain that only the
neuron feeds (:func:`worker.shapley.players.gate_site`), and computes, per
channel, with ``m`` 1 to keep and 0 to remove:

* ``zero``: ``x · m``;
* ``mean``: ``x · m + fill · (1 − m)``, ``fill`` the game's own per-channel mean (measured on the job's data).

Where every input is finite this equals the game's gate (``x · m``, and
``fill + (x − fill) · m``) on each removed channel bit for bit, and keeps a
kept channel's value unchanged; only layers with a removed neuron get a gate.

* **An ONNX upload** is rewritten, not re-exported: its graph, names, opset,
  inputs and outputs stay as uploaded (a batch the file fixes at 1 stays 1),
  and a ``Mul`` (and for ``mean`` an ``Add``) is inserted after each gated
  tensor. The importer records which ONNX values each FX node computes
  (``meta["onnx_values"]``), which maps the game's gate sites back to tensor
  names.
* **A .pt2 upload** has no ONNX file to rewrite: the gates are inserted in its
  FX graph and it is exported with ``torch.onnx.export`` (the dynamo
  exporter, batch dimension dynamic), input and output named after the
  program's.

The mask constants are float32, the dtype the game runs in.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import torch
import torch.fx

from .editing import player_ids
from .errors import ModelError
from .game import NeuronGame
from .loading import load_model
from .masking import Gate
from .players import gate_site

__all__ = ["edited_onnx"]

_MIN_OPSET = 7  # Mul and Add broadcast numpy-style from opset 7 on (earlier ones need broadcast/axis attributes)


@dataclass(frozen=True)
class _LayerGate:
    """One layer's gate as constants shaped to broadcast over its activation (channel dim 1, or last for linear)."""

    mask: np.ndarray
    fill_term: np.ndarray | None  # fill · (1 − m), for the mean policy


def edited_onnx(
    model_path: str | os.PathLike,
    game: NeuronGame,
    removed: Sequence[Mapping[str, Any]],
    gm: torch.fx.GraphModule | None = None,
) -> bytes:
    """The model at ``model_path`` (the job's upload) with the ``removed`` neurons removed, as ONNX bytes.

    Args:
        model_path: the job's model file (``.onnx`` or ``.pt2``).
        game: the job's game, for its layers, ablation policy and mean fills.
        removed: ``{"layer", "index"}`` records, as an edit's ``removed``.
        gm: the graph ``load_model(model_path)`` gave, when the caller has it (else it is loaded again).
    """
    path = Path(model_path)
    gm = gm if gm is not None else load_model(path)
    gates = _layer_gates(game, removed, gm)
    if path.suffix.lower() == ".onnx":
        return _rewrite_onnx(onnx.load(str(path)), gm, gates).SerializeToString()
    return _export_pt2(gm, gates, game.data.inputs[:2])


def _layer_gates(
    game: NeuronGame, removed: Sequence[Mapping[str, Any]], gm: torch.fx.GraphModule
) -> dict[str, _LayerGate]:
    fills = {m.offset: m.fill for m in game.model.suffix.modules() if isinstance(m, Gate)}
    ids = set(player_ids(game, removed, "removed"))
    weights = {node.meta["layer"]: node.args[1] for node in gm.graph.nodes if "layer" in node.meta}
    gates = {}
    for layer in game.layers:
        keep = torch.tensor([layer.offset + i not in ids for i in range(layer.size)], dtype=torch.float32)
        if bool(keep.all()):
            continue
        spatial = _weight_rank(gm, weights[layer.name]) - 2 if layer.kind == "conv" else 0
        shape = (layer.size,) + (1,) * spatial  # broadcasts from the right: channel dim 1, or last for linear
        fill = fills.get(layer.offset)
        gates[layer.name] = _LayerGate(
            keep.reshape(shape).numpy(),
            None if fill is None else (fill.detach().cpu().float() * (1 - keep)).reshape(shape).numpy(),
        )
    return gates


def _weight_rank(gm: torch.fx.GraphModule, weight: Any) -> int:
    target = weight.target if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" else None
    if target is None:
        raise ModelError(f"A layer's weight ({weight}) is not a stored tensor; its neurons cannot be gated.")
    obj: Any = gm
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return int(obj.ndim)


def _sites(gm: torch.fx.GraphModule, names: Sequence[str]) -> list[tuple[str, torch.fx.Node]]:
    """(layer, gate site) of every layer node of ``names``: a layer called twice has two sites."""
    return [(n.meta["layer"], gate_site(n)) for n in gm.graph.nodes if n.meta.get("layer") in names]


def _rewrite_onnx(model: onnx.ModelProto, gm: torch.fx.GraphModule, gates: dict[str, _LayerGate]) -> onnx.ModelProto:
    """Insert each gate after the ONNX tensor(s) its site computes; every consumer and output then reads the gate."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < _MIN_OPSET:
        raise ModelError(
            f"The model's opset is {opset}; the edited file keeps the upload's opset, which must be {_MIN_OPSET} or "
            "later. Re-export the model with a newer opset (torch.onnx.export(..., opset_version=17))."
        )
    graph = model.graph
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    outputs = {o.name for o in graph.output}
    taken = set(producer) | {i.name for i in graph.input} | {t.name for t in graph.initializer} | set(consumers)
    taken |= {n.name for n in graph.node}

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    after: dict[int, list[onnx.NodeProto]] = {}
    for layer, site in _sites(gm, list(gates)):
        values = [v for v in site.meta.get("onnx_values", []) if v in producer]
        if not values:
            raise ModelError(
                f"Layer {layer!r}'s neurons are removed after an op that has no tensor of its own in the ONNX file "
                f"({site.name}); the edited model cannot be written as a rewrite of the upload."
            )
        made = {producer[v] for v in values}
        for value in values:
            # A value read only by nodes that compute another of the site's values (an Identity, a bias Add
            # folded into its MatMul) is gated there; the gate is idempotent, so a value gated twice is also right.
            if value not in outputs and all(c in made and c != producer[value] for c in consumers.get(value, [])):
                continue
            gate = gates[layer]
            ungated = fresh(f"{value}_ungated")
            node = graph.node[producer[value]]
            node.output[list(node.output).index(value)] = ungated
            mask = fresh(f"{layer}_edit_mask")
            new = [
                _constant(mask, gate.mask, fresh(f"{layer}_edit_mask_const")),
            ]
            if gate.fill_term is None:
                new.append(onnx.helper.make_node("Mul", [ungated, mask], [value], name=fresh(f"{layer}_edit_gate")))
            else:
                fill, kept = fresh(f"{layer}_edit_fill"), fresh(f"{value}_kept")
                new += [
                    _constant(fill, gate.fill_term, fresh(f"{layer}_edit_fill_const")),
                    onnx.helper.make_node("Mul", [ungated, mask], [kept], name=fresh(f"{layer}_edit_gate")),
                    onnx.helper.make_node("Add", [kept, fill], [value], name=fresh(f"{layer}_edit_fill_add")),
                ]
            after.setdefault(producer[value], []).extend(new)
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.append(node)
        nodes.extend(after.get(i, []))
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _constant(name: str, value: np.ndarray, node_name: str) -> onnx.NodeProto:
    tensor = onnx.numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name)
    return onnx.helper.make_node("Constant", [], [name], value=tensor, name=node_name)


def _export_pt2(gm: torch.fx.GraphModule, gates: dict[str, _LayerGate], example: torch.Tensor) -> bytes:
    """Gate the program's FX graph (a copy: the caller's stays as loaded) and export it with the dynamo exporter."""
    gm = copy.deepcopy(gm).eval()
    graph = gm.graph
    for k, (layer, site) in enumerate(_sites(gm, list(gates))):
        gate = gates[layer]
        users = list(site.users)
        gm.register_buffer(f"_edit_mask_{k}", torch.from_numpy(gate.mask))
        with graph.inserting_after(site):
            mask = graph.get_attr(f"_edit_mask_{k}")
        with graph.inserting_after(mask):
            out = graph.call_function(torch.mul, (site, mask))
        if gate.fill_term is not None:
            gm.register_buffer(f"_edit_fill_{k}", torch.from_numpy(gate.fill_term))
            with graph.inserting_after(out):
                fill = graph.get_attr(f"_edit_fill_{k}")
            with graph.inserting_after(fill):
                out = graph.call_function(torch.add, (out, fill))
        for user in users:
            user.replace_input_with(site, out)
    graph.lint()
    gm.recompile()
    (input_name,) = [n.name for n in graph.nodes if n.op == "placeholder"]  # the program's input, e.g. `x`
    try:
        onnx_program = torch.onnx.export(
            gm,
            (example,),
            dynamo=True,
            verbose=False,
            input_names=[input_name],
            output_names=["output"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
        assert onnx_program is not None  # dynamo=True always returns the program
        with tempfile.TemporaryDirectory() as tmp:  # save() writes a path; it may put large weights beside it
            onnx_program.save(Path(tmp) / "edited.onnx", external_data=False)
            return (Path(tmp) / "edited.onnx").read_bytes()
    except Exception as exc:  # the exporter raises many types; its message says which op
        raise ModelError(
            f"The edited .pt2 program could not be exported to ONNX "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}); upload the model as ONNX to get an edited ONNX file."
        ) from exc
