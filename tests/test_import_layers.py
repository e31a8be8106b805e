"""Imports run one way: neuronshap (the command, the assembled server) → worker → app; the estimator imports none.

    neuronshap/      the command, its HTTP client, the API wired to the worker's runner
      ├─▶ worker/    the runner, the Celery task, the spec translator
      │     ├─▶ worker/shapley/   the estimator: pure PyTorch, imports nothing of ours
      │     └─▶ app/
      └─▶ app/       the API and its infrastructure: never the worker, never torch

Checked twice: statically, every import statement in every module (lazy ones
inside functions included), and at run time, that the API process loads no
torch and no worker module until a job runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.imports import imported_names as names_in

ROOT = Path(__file__).resolve().parents[1]

# package → top-level names its modules must never import
FORBIDDEN = {
    "app": {"worker", "neuronshap", "torch", "onnx"},
    "worker/shapley": {
        "app",
        "neuronshap",
        "worker.runner",
        "worker.tasks",
        "worker.translate",
        "fastapi",
        "sqlalchemy",
        "celery",
        "redis",
    },
    "worker": {"neuronshap"},
}


def imported_names(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    return names_in(path, ROOT)


def violations(directory: str, forbidden: set[str]) -> list[str]:
    found = []
    for path in sorted((ROOT / directory).rglob("*.py")):
        for name in imported_names(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


@pytest.mark.parametrize("directory", FORBIDDEN)
def test_no_module_imports_against_the_direction(directory):
    assert violations(directory, FORBIDDEN[directory]) == []


def test_the_check_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The static check would catch the import circle this layout replaced (a queue importing the runner lazily)."""
    package = tmp_path / "app" / "core"
    package.mkdir(parents=True)
    (package / "queue.py").write_text("def run():\n    from worker.runner import run_job\n    from ..jobs import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations("app", {"worker"}) == ["app/core/queue.py imports worker.runner"]
    assert imported_names(package / "queue.py") == {"worker.runner", "app.jobs"}


def test_the_api_process_loads_neither_torch_nor_the_worker(tmp_path):
    probe = f"""
import sys
from fastapi.testclient import TestClient
from app.core.config import Settings
from neuronshap.server import create_server_app
import neuronshap.cli
with TestClient(create_server_app(Settings(data_dir={str(tmp_path)!r}))) as client:
    assert client.get("/v1/jobs").status_code == 200
    assert client.get("/openapi.json").status_code == 200
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "worker", "onnx"))
print(loaded)
"""
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
