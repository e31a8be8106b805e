"""Refused before a job exists: the submission check (worker/preflight.py), on both stacks.

A model that does not load, data it cannot take and a spec that does not fit
it are a 422 at ``POST /v1/jobs`` naming the uploaded file and the fix: no
job is made and nothing of the submission stays in the blob store. A good
model is still accepted and runs; a check that cannot finish in time accepts
the job, and the worker judges it (with a message that names no temp path).
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

from app.core.blobs import BlobStore
from tests.harness import stacks
from tests.harness.jobs import QUICK, post_job, problem, submit


@pytest.fixture(scope="module", params=["embedded", pytest.param("full", marks=pytest.mark.service)])
def stack(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    # Time enough for every check to conclude on a loaded machine: these tests are about what a check says.
    with getattr(stacks, request.param)(tmp, preflight_timeout_s=600) as s:
        yield s


def npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def with_unsupported_op(path: Path) -> bytes:
    """The model with its first Relu made a Shrink: a standard ONNX operator the converter does not support."""
    model = onnx.load(path)
    next(n for n in model.graph.node if n.op_type == "Relu").op_type = "Shrink"
    return model.SerializeToString()


def blobs(stack: stacks.Stack) -> set[Path]:
    return {p for p in stack.settings.resolved_blob_dir.rglob("*") if p.is_file()}


def job_ids(stack: stacks.Stack) -> set[str]:
    return {j["id"] for j in stack.client.get("/v1/jobs", params={"limit": 500}).json()["items"]}


def refusals(tiny_cnn) -> list[tuple[str, dict, tuple[str, bytes], tuple[str, bytes], str, str, tuple[str, ...]]]:
    """(case, spec, model part, data part, field, problem type, words of the fix)."""
    model = ("vendor-cnn.onnx", tiny_cnn.onnx.read_bytes())
    data = ("eval-set.npz", tiny_cnn.npz.read_bytes())
    x, y = tiny_cnn.x.numpy(), tiny_cnn.y.numpy()
    return [
        (
            "unsupported op",
            QUICK,
            ("shrunk.onnx", with_unsupported_op(tiny_cnn.onnx)),
            data,
            "model",
            "model-error",
            ("Shrink", "onnxsim"),
        ),
        (
            "truncated model",
            QUICK,
            ("cut-short.onnx", tiny_cnn.onnx.read_bytes()[: tiny_cnn.onnx.stat().st_size // 2]),
            data,
            "model",
            "model-error",
            ("truncated", "torch.onnx.export"),
        ),
        (
            "data of the wrong shape",
            QUICK,
            model,
            ("five-by-five.npz", npz(inputs=np.zeros((20, 1, 5, 5), np.float32), labels=np.zeros(20, np.int64))),
            "data",
            "data-error",
            ("fixes the spatial size", "Resize (or crop) the data to 8×8"),
        ),
        (
            "labels beyond the model's classes",
            QUICK,
            model,
            ("shifted-labels.npz", npz(inputs=x, labels=y + 7)),
            "spec",
            "spec-error",
            ("10 classes", "belong together"),
        ),
        (
            "unknown layer glob",
            {"metric": {"name": "accuracy"}, "players": {"layers": ["fire9/*"]}},
            model,
            data,
            "spec",
            "spec-error",
            ("fire9/*", "layers are"),
        ),
    ]


def test_bad_uploads_are_refused_at_submission_naming_the_file_and_the_fix(stack, tiny_cnn):
    for case, spec, model, data, field, kind, fix in refusals(tiny_cnn):
        jobs_before, blobs_before = job_ids(stack), blobs(stack)
        body = problem(post_job(stack.client, spec=spec, model=model, data=data), 422, field)
        assert body["type"].endswith("/" + kind), (case, body)
        named = model[0] if field == "model" else data[0] if field == "data" else model[0]
        assert named in body["detail"], (case, body)
        assert all(word in body["detail"] for word in fix), (case, body)
        assert str(stack.settings.resolved_blob_dir) not in body["detail"] and "/tmp" not in body["detail"], case
        assert job_ids(stack) == jobs_before, case  # no job was made
        assert blobs(stack) == blobs_before, case  # and nothing of it was kept


def test_a_good_model_is_still_accepted_and_runs(stack, tiny_cnn):
    job = submit(stack.client, tiny_cnn, QUICK)
    done = stack.wait(job["id"], ("succeeded", "failed"))
    assert done["state"] == "succeeded", done["error"]


def test_bfloat16_inputs_are_a_data_error_at_submission(stack, tiny_cnn, tmp_path):
    path = tmp_path / "bf16-eval.safetensors"
    save_file({"inputs": tiny_cnn.x.to(torch.bfloat16), "labels": tiny_cnn.y}, path)
    blobs_before = blobs(stack)
    body = problem(post_job(stack.client, tiny_cnn, data=(path.name, path.read_bytes())), 422, "data")
    assert body["type"].endswith("/data-error") and "bf16-eval.safetensors" in body["detail"]
    assert "float32" in body["detail"]
    assert blobs(stack) == blobs_before


def test_refusals_before_the_check_leave_no_blob_either(stack, tiny_cnn):
    """A bad Idempotency-Key, an unreadable or an empty data file, after the model was stored: both blobs go."""
    blobs_before = blobs(stack)
    problem(post_job(stack.client, tiny_cnn, headers={"Idempotency-Key": "k" * 201}), 400, "Idempotency-Key")
    problem(post_job(stack.client, tiny_cnn, data=("eval.npz", b"not a zip")), 422, "data")
    problem(post_job(stack.client, tiny_cnn, data=("eval.npz", b"")), 422, "data")
    assert blobs(stack) == blobs_before


def test_a_check_out_of_time_accepts_and_the_worker_judges_without_a_temp_path(tiny_cnn, tmp_path):
    """``preflight_timeout_s`` so short no check finishes: the job is made, and the worker fails it."""
    with stacks.embedded(tmp_path, preflight_timeout_s=1e-6) as stack:
        model = ("shrunk.onnx", with_unsupported_op(tiny_cnn.onnx))
        job = submit(stack.client, tiny_cnn, QUICK, model=model)
        failed = stack.wait(job["id"], ("failed", "succeeded"))
    assert failed["state"] == "failed" and failed["error"]["type"] == "model-error", failed
    assert "'shrunk.onnx'" in failed["error"]["detail"] and "/tmp" not in failed["error"]["detail"], failed["error"]


def test_a_refusal_keeps_the_bytes_another_request_holds(tmp_path):
    """The same file in two submissions is one blob: the refused one must not delete it under the other."""
    store = BlobStore(tmp_path)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"the same model"

    digest, _ = asyncio.run(store.put_stream(chunks(), limit=100))  # an accepted submission, still being checked
    again, _ = asyncio.run(store.put_stream(chunks(), limit=100))  # a second one, refused
    store.unpin(again)
    store.delete(again)
    assert store.exists(digest)
    store.unpin(digest)
    store.delete(digest, unused=lambda: False)  # a job refers to it
    assert store.exists(digest)
    store.delete(digest)
    assert not store.exists(digest)


def test_the_check_loads_torch_in_its_child_not_in_the_api_process(tmp_path, tiny_cnn):
    """Submissions are checked (a 202 and a 422) and the API process has still not imported torch or onnx."""
    shrunk = tmp_path / "shrunk.onnx"
    shrunk.write_bytes(with_unsupported_op(tiny_cnn.onnx))
    probe = f"""
import sys
from pathlib import Path
from fastapi.testclient import TestClient
from app.core.config import Settings
from app.main import create_app
from neuronshap.server import check_upload

data = ("eval.npz", Path({str(tiny_cnn.npz)!r}).read_bytes())
spec = {{"spec": '{{"metric": {{"name": "accuracy"}}}}'}}
settings = Settings(data_dir={str(tmp_path / "svc")!r}, preflight_timeout_s=600)
# Jobs stay queued (nothing runs them in this process): what loads here is the submission's doing alone.
with TestClient(create_app(settings, run_job=lambda *args: None, check_upload=check_upload)) as client:
    for model in (Path({str(tiny_cnn.onnx)!r}), Path({str(shrunk)!r})):
        files = {{"model": (model.name, model.read_bytes()), "data": data}}
        print(client.post("/v1/jobs", files=files, data=spec).status_code)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx")))
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=stacks.ROOT, capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["202", "422", "[]"], result.stdout


def test_the_check_server_outlives_a_check_that_crashes(tiny_cnn, tmp_path):
    """A check killed by its memory limit is no answer (the job would be accepted, the worker judges), and the
    next check, forked from the same server, answers as usual."""
    from worker.preflight import _Server

    (tmp_path / "cnn.onnx").symlink_to(tiny_cnn.onnx)
    (tmp_path / "eval.npz").symlink_to(tiny_cnn.npz)
    request = {"cwd": str(tmp_path), "model": "cnn.onnx", "data": "eval.npz", "spec": json.dumps(QUICK)}
    server = _Server()
    answer, trouble = server.check(request, memory_bytes=1 << 20, timeout_s=120)  # 1 MiB: nothing fits
    assert answer is None and "without an answer" in trouble
    answer, trouble = server.check(request, memory_bytes=4 << 30, timeout_s=120)
    assert answer is not None and answer["ok"] and answer["players"] > 0, trouble
    first = server._process
    answer, _ = server.check(request, memory_bytes=4 << 30, timeout_s=120)
    assert answer is not None and answer["ok"] and server._process is first  # one server, one fork per check


def test_a_dead_servers_reader_wakes_only_the_checks_sent_to_it():
    """When a server's output ends, the checks it had are answered 'no answer' at once; a check sent meanwhile to
    the server started after it died must keep waiting for that one (it was woken too, and accepted unchecked)."""
    import threading
    from types import SimpleNamespace
    from typing import Any, cast

    from worker.preflight import _Server

    server = _Server()
    dead, replacement = SimpleNamespace(stdout=io.StringIO("")), SimpleNamespace(stdout=io.StringIO(""))
    its_check, next_servers_check = threading.Event(), threading.Event()
    server._waiting = cast(Any, {"a": (its_check, [], dead), "b": (next_servers_check, [], replacement)})
    server._answers(cast(Any, dead))
    assert its_check.is_set() and not next_servers_check.is_set()
