"""Turn a model file into an FX graph in which a mask can sit at any neuron.

Two formats are accepted, both of which give a ``torch.fx.GraphModule``:

* ONNX (a single file, no external data), converted by our own small importer
  (:mod:`worker.shapley.onnx_import`). We do not use onnx2torch: it imports
  torchvision, which does not load beside the CPU torch wheel we ship with.
* ``torch.export`` programs (``.pt2``). Loading one unpickles parts of the
  archive, so it is kept behind :func:`load_exported_program_unsafe`, the one
  place a later hardening step has to lock down.

Every conv/linear node of the returned graph carries ``meta["layer"]`` (the
module name the user knows, such as ``layer1.0.conv1``) and
``meta["layer_kind"]`` (``"conv"`` or ``"linear"``), whatever the format.
An ONNX model's ``gm.meta`` also says what loading it changed:
``onnx_upgraded_from_opset`` (an opset older than 11, upgraded with
onnx.version_converter), ``onnx_batch_reshapes_rewritten`` (Reshapes of a
batch the file fixes at 1, made batch-size free) and ``output_flattened``
(``[N, C, 1, 1]`` class scores returned as ``[N, C]``).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch
import torch.fx

from .errors import ModelError
from .graph_ops import CONV_TARGETS, LINEAR_TARGETS

__all__ = ["load_model", "load_exported_program_unsafe"]

_ONNX_SUFFIXES = {".onnx"}
_EXPORT_SUFFIXES = {".pt2"}


def load_model(path: str | os.PathLike) -> torch.fx.GraphModule:
    """Load an ONNX or ``torch.export`` model from ``path`` as an annotated FX graph."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Model file {str(path)!r} does not exist; pass the path of an .onnx or .pt2 file.")
    suffix = path.suffix.lower()
    if suffix in _ONNX_SUFFIXES:
        from .onnx_import import onnx_to_graph_module

        gm = onnx_to_graph_module(path).eval()
        if gm.meta.get("onnx_output_unit_spatial"):
            _flatten_output(gm)
    elif suffix in _EXPORT_SUFFIXES:
        gm = _annotate_exported(load_exported_program_unsafe(path).module())
    else:
        raise ModelError(
            f"Model file {path.name!r} has an unknown extension {suffix!r}; "
            "upload an ONNX model (.onnx, from torch.onnx.export) "
            "or a torch.export program (.pt2, from torch.export.save)."
        )
    return gm


def _flatten_output(gm: torch.fx.GraphModule) -> None:
    """Make ``[N, C, 1, 1]`` class scores (a conv classifier head) ``[N, C]``.

    The metrics read classes on the last dimension; a fully convolutional
    classifier (SqueezeNet, DenseNet from the ONNX Model Zoo) ends with two
    unit spatial dimensions instead.
    """
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    (value,) = output.args
    with gm.graph.inserting_before(output):
        flat = gm.graph.call_function(torch.flatten, (value, 1))
    output.args = (flat,)
    gm.meta["output_flattened"] = True
    gm.recompile()


def load_exported_program_unsafe(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """Load a ``.pt2`` archive written by ``torch.export.save``.

    Unsafe: ``torch.export.load`` unpickles parts of the archive, so a crafted
    file can run code in this process. Only call it on files you trust.
    """
    if not zipfile.is_zipfile(path):
        raise ModelError(
            f"{Path(path).name!r} is not a torch.export archive (a .pt2 file is a zip written by torch.export.save); "
            "re-save the model with "
            "torch.export.save(torch.export.export(model, example_inputs, dynamic_shapes=...), path)."
        )
    try:
        return torch.export.load(path)
    except Exception as exc:  # torch raises many types for a bad archive
        raise ModelError(
            f"Could not load {Path(path).name!r} as a torch.export program ({type(exc).__name__}: {exc}); "
            "re-save it with torch.export.save using the same PyTorch major version."
        ) from exc


def _annotate_exported(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Name each conv/linear node after the module that called it.

    ``nn_module_stack`` names the innermost module; when one module holds
    several convolutions with different weights (a functional block), the
    names get ``_1``, ``_2`` suffixes so every layer stays addressable. A
    module called twice (shared weights) keeps one name: its neurons are the
    same players at both call sites.
    """
    taken: dict[str, object] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in CONV_TARGETS | LINEAR_TARGETS:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        base = next(reversed(stack.values()))[0] if stack else ""
        base = base or node.name
        weight = node.args[1]
        name, i = base, 0
        while name in taken and taken[name] is not weight:
            i += 1
            name = f"{base}_{i}"
        taken[name] = weight
        node.meta["layer"] = name
        node.meta["layer_kind"] = "conv" if node.target in CONV_TARGETS else "linear"
    return gm
