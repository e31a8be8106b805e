"""The evaluation set: ``inputs``, ``labels`` and optional ``groups``.

Read from ``.npz`` (never with pickle) or ``.safetensors``, and checked before
any model runs so that a bad file fails in a second with a message, not after
an hour of forward passes.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

__all__ = ["EvalData", "load_data"]


@dataclass(frozen=True)
class EvalData:
    inputs: torch.Tensor  # float32, [N, ...]
    labels: torch.Tensor  # int64, [N]
    groups: torch.Tensor | None = None  # int64, [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, keep: torch.Tensor) -> EvalData:
        return EvalData(self.inputs[keep], self.labels[keep], None if self.groups is None else self.groups[keep])


def load_data(path: str | os.PathLike) -> EvalData:
    """Read and validate an evaluation set file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file {str(path)!r} does not exist; pass an .npz or .safetensors file.")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        arrays = _read_npz(path)
    elif suffix == ".safetensors":
        arrays = _read_safetensors(path)
    else:
        raise DataError(
            f"Data file {path.name!r} has an unknown extension {suffix!r}; use .npz (numpy.savez) "
            "or .safetensors with arrays `inputs`, `labels` and optionally `groups`."
        )
    return from_arrays(arrays, source=path.name)


def from_arrays(arrays: dict[str, np.ndarray], source: str = "data") -> EvalData:
    """Validate named arrays and turn them into tensors."""
    missing = [k for k in ("inputs", "labels") if k not in arrays]
    if missing:
        raise DataError(
            f"{source} has no array named {', '.join(map(repr, missing))} "
            f"(it has: {', '.join(sorted(arrays)) or 'none'}); "
            "save the examples as `inputs` (float32, examples along the first dimension) "
            "and the classes as `labels` (int64)."
        )
    inputs, labels = np.asarray(arrays["inputs"]), np.asarray(arrays["labels"])
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise DataError(f"{source}: `inputs` is empty; the evaluation set needs at least one example.")
    if not np.issubdtype(inputs.dtype, np.floating):
        raise DataError(f"{source}: `inputs` has dtype {inputs.dtype}; save it as float32.")
    if not np.isfinite(inputs).all():
        raise DataError(f"{source}: `inputs` contains NaN or infinite values; clean or drop those examples.")
    n = inputs.shape[0]
    labels = _index_array(labels, "labels", n, source)
    groups = _index_array(np.asarray(arrays["groups"]), "groups", n, source) if "groups" in arrays else None
    return EvalData(
        inputs=torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)),
        labels=torch.from_numpy(labels),
        groups=None if groups is None else torch.from_numpy(groups),
    )


def _index_array(values: np.ndarray, name: str, n: int, source: str) -> np.ndarray:
    if values.shape != (n,):
        raise DataError(
            f"{source}: `{name}` has shape {values.shape} but `inputs` has {n} examples; "
            f"`{name}` must be one integer per example, shape ({n},)."
        )
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all() or not (values == np.round(values)).all():
            raise DataError(f"{source}: `{name}` must hold whole numbers (int64); it has fractions, NaN or inf.")
    elif not np.issubdtype(values.dtype, np.integer):
        raise DataError(f"{source}: `{name}` has dtype {values.dtype}; save it as int64.")
    values = values.astype(np.int64)
    if (values < 0).any():
        raise DataError(f"{source}: `{name}` has negative values; use 0, 1, 2, … for classes and groups.")
    return values


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):  # np.load would fall back to unpickling it
        raise DataError(f"{path.name} is not a valid .npz archive (not a zip file); write it with numpy.savez.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(
                f"{path.name} stores Python objects, which are not loaded for safety; "
                "save plain numeric arrays (numpy.savez with float32/int64 arrays)."
            ) from exc
        raise DataError(f"{path.name} is not a valid .npz archive ({exc}); write it with numpy.savez.") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path.name} is not a valid .npz archive ({exc}); write it with numpy.savez.") from exc


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(
            f"{path.name} is not a valid .safetensors file ({exc}); write it with safetensors.numpy.save_file."
        ) from exc
