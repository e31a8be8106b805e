"""Uploads put on disk under the names their clients gave them, so that every message names the user's file.

Blobs are stored by hash, the loaders read a file's format from its extension, and their errors name the path
they read. A worker or a submission check therefore links each blob into a temporary directory under its
client's file name (only its last component, printable, with the format's extension added where it lacks it)
and strips that directory from the messages: the user reads ``'resnet50-v1.onnx': …``, never a server's path
or a name of ours.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["client_name", "link"]


def client_name(filename: str | None, fmt: str, fallback: str) -> str:
    """The name a file is put under: the client's (sanitised), else ``fallback``, ending in ``.fmt``."""
    name = Path((filename or "").replace("\\", "/")).name
    name = "".join(c for c in name if c.isprintable()).strip()[:120]
    if not name or name.startswith("."):
        name = fallback
    if not name.lower().endswith(f".{fmt}"):
        name += f".{fmt}"
    return name


def link(directory: Path, blob: Path, filename: str | None, fmt: str, fallback: str) -> Path:
    """A link to ``blob`` in ``directory`` under :func:`client_name`; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / client_name(filename, fmt, fallback)
    path.symlink_to(blob.resolve())
    return path
