"""What a Python file imports, read from its source (every import statement, lazy ones inside functions too)."""

from __future__ import annotations

import ast
from pathlib import Path


def imported_names(path: Path, root: Path, *, members: bool = False) -> set[str]:
    """Absolute module names ``path`` imports, relative imports resolved against its package under ``root``.

    With ``members``, ``from m import x`` also gives ``m.x``: ``x`` may be a module (``from tests import stacks``).
    """
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            if members:
                names.update(f"{module}.{alias.name}" for alias in node.names)
    return names
