"""What an upload is, judged from its bytes before any job is made of it.

The API checks what it can without torch: the model's container format
(and whether loading it would run code), and the data file's arrays, their
names, dtypes and shapes, read from headers only (a multi-GB data file is
never loaded here). Whether the model loads, accepts the data and fits the
spec needs torch: a :class:`CheckUpload` answers that, injected by whoever
assembles the service (``neuronshap.server`` wires ``worker.preflight``).
"""

from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from app.core.problems import Problem

from .spec import JobSpec

MAX_NPZ_MEMBERS = 16
PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".torchscript"}
INT_DTYPES = {"int64", "int32", "int16", "int8", "uint8", "I64", "I32", "I16", "I8", "U8"}
FLOAT_DTYPES = {"float32", "float64", "float16", "F32", "F64", "F16"}
BFLOAT16 = {"bfloat16", "BF16"}  # floating point, but numpy (which reads the data) has no such type
RejectedPart = Literal["model", "data", "spec"]


@dataclass(frozen=True)
class StoredUpload:
    """An upload in the blob store: where its bytes are, its format (``onnx``, ``npz``…) and the name its client
    gave it, which is what messages about it say (never the blob's path)."""

    path: Path
    format: str
    filename: str | None


@dataclass(frozen=True)
class Rejection:
    """Why a check refused a submission: the part at fault, and a message that names the file and the fix."""

    part: RejectedPart
    detail: str


class CheckUpload(Protocol):
    """Does the model load, take the data and fit the spec? Takes up to ``timeout_s``.

    Returns a :class:`Rejection`, or None when the uploads passed or the check
    could not tell in time (the worker, which checks again, judges the job).
    """

    def __call__(
        self, spec: JobSpec, model: StoredUpload, data: StoredUpload, timeout_s: float
    ) -> Rejection | None: ...


def rejected(rejection: Rejection) -> Problem:
    """The problem a :class:`Rejection` is answered with: ``model-error``, ``data-error`` or ``spec-error``, the
    types a job failed by the worker has for the same mistakes."""
    titles = {"model": "Model rejected", "data": "Data rejected", "spec": "Spec does not fit the model"}
    return Problem(422, f"{rejection.part}-error", titles[rejection.part], rejection.detail, field=rejection.part)


def _unsupported(field: str, detail: str) -> Problem:
    return Problem(415, "unsupported-file", "Unsupported file", detail, field=field)


def _bad(field: str, detail: str) -> Problem:
    return Problem(422, "invalid-file", "Invalid file", detail, field=field)


def model_format(filename: str | None, path: Path, allow_pickle: bool) -> str:
    """``onnx`` or ``pt2``; a :class:`Problem` for anything else or for a model that would run code."""
    suffix = Path(filename or "").suffix.lower()
    with open(path, "rb") as f:
        head = f.read(4)
    if suffix == ".onnx" or (not suffix and head[:1] == b"\x08"):
        if not head or head[:1] != b"\x08":  # an ONNX ModelProto starts with field 1 (ir_version), a varint
            raise _bad(
                "model",
                "The model file is not an ONNX model (it does not start like one). "
                "Export it with torch.onnx.export(..., external_data=False) and upload the .onnx file.",
            )
        return "onnx"
    if suffix == ".pt2":
        if head != b"PK\x03\x04":
            raise _bad(
                "model", "The .pt2 file is not a torch.export archive (not a zip file); save it with torch.export.save."
            )
        if not allow_pickle:
            raise _unsupported(
                "model",
                "Loading a .pt2 program unpickles, which can run code, so this service refuses it "
                "unless its operator sets NEURONSHAP_ALLOW_PICKLE_MODELS=true. Upload an ONNX "
                "export instead (torch.onnx.export(model, example, 'model.onnx', external_data=False)).",
            )
        return "pt2"
    if suffix in PICKLE_SUFFIXES:
        raise _unsupported(
            "model",
            f"{suffix} files are pickles, and loading a pickle runs code; this service does not. "
            "Export the model to ONNX (torch.onnx.export(..., external_data=False)) and upload that.",
        )
    raise _unsupported(
        "model",
        f"The model must be an ONNX file (.onnx) or a torch.export program (.pt2); got "
        f"{filename or 'a file without a name'!r}.",
    )


def data_format(filename: str | None, path: Path, max_unpacked: int) -> str:
    """``npz`` or ``safetensors``, after checking the arrays' names, dtypes and shapes from the headers.

    ``max_unpacked`` bounds what an ``.npz`` (a zip) may expand to, so a
    small upload cannot unpack into a worker-killing one.
    """
    suffix = Path(filename or "").suffix.lower()
    if suffix == ".npz":
        arrays = _npz_headers(path, max_unpacked)
        fmt = "npz"
    elif suffix == ".safetensors":
        arrays = _safetensors_headers(path)
        fmt = "safetensors"
    else:
        raise _unsupported(
            "data",
            f"The data must be .npz or .safetensors with arrays `inputs`, `labels` and "
            f"optionally `groups`; got {filename or 'a file without a name'!r}.",
        )
    _check_arrays(arrays, Path(filename or "the data file").name)
    return fmt


def _npz_headers(path: Path, max_unpacked: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
            if len(members) > MAX_NPZ_MEMBERS:
                raise _bad(
                    "data",
                    f"The .npz file has {len(members)} entries; it should hold only `inputs`, `labels` and `groups`.",
                )
            unpacked = sum(m.file_size for m in members)
            if unpacked > max_unpacked:
                raise Problem(
                    413,
                    "too-large",
                    "Data too large",
                    f"The .npz file unpacks to {unpacked} bytes, over this service's limit of {max_unpacked}; "
                    "send a smaller evaluation set.",
                    field="data",
                )
            arrays = {}
            for info in members:
                name = info.filename.removesuffix(".npy")
                if name not in ("inputs", "labels", "groups"):
                    continue
                with zf.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = {
                        (1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0,
                    }.get(version)
                    if read_header is None:
                        raise ValueError(f"unsupported .npy format version {version}")
                    shape, _, dtype = read_header(member)  # the header only, not the data
                if dtype.hasobject:
                    raise _bad("data", f"`{name}` holds Python objects (dtype {dtype}); save numeric arrays only.")
                arrays[name] = (dtype.name, tuple(shape))
            return arrays
    except Problem:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise _bad("data", f"The .npz file cannot be read ({exc}); write it with numpy.savez.") from exc


def _safetensors_headers(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(size - 8, 100 << 20):
                raise ValueError(f"header length {length} does not fit the file")
            header = json.loads(f.read(length))
        return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k in ("inputs", "labels", "groups")}
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _bad(
            "data", f"The .safetensors file cannot be read ({exc}); write it with safetensors' save_file."
        ) from exc


def _check_arrays(arrays: dict[str, tuple[str, tuple[int, ...]]], source: str) -> None:
    for needed in ("inputs", "labels"):
        if needed not in arrays:
            raise _bad(
                "data",
                f"The data file has no `{needed}` array; it needs `inputs` (float, examples first), "
                "`labels` (int64) and, for group metrics, `groups` (int64).",
            )
    in_dtype, in_shape = arrays["inputs"]
    if in_dtype in BFLOAT16:
        raise rejected(
            Rejection(
                "data",
                f"{source}: `inputs` has dtype {in_dtype}, which this service cannot read (numpy has no "
                "bfloat16); save it as float32 (inputs.float() in torch before safetensors' save_file).",
            )
        )
    if in_dtype not in FLOAT_DTYPES:
        raise _bad("data", f"`inputs` has dtype {in_dtype}; it must be floating point (float32).")
    if len(in_shape) < 1 or in_shape[0] == 0:
        raise _bad("data", f"`inputs` has shape {in_shape}; it needs at least one example (first dimension).")
    for name in ("labels", "groups"):
        if name not in arrays:
            continue
        dtype, shape = arrays[name]
        if dtype not in INT_DTYPES:
            raise _bad("data", f"`{name}` has dtype {dtype}; it must be integer (int64).")
        if shape != (in_shape[0],):
            raise _bad("data", f"`{name}` has shape {shape}; it must be one value per example: ({in_shape[0]},).")
