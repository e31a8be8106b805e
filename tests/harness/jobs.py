"""Posting jobs and reading answers: the specs the tests submit, one way to POST a job, one check of a problem."""

from __future__ import annotations

import json
from collections.abc import Collection

import httpx

from tests.harness.models import Saved

QUICK = {"metric": {"name": "accuracy"}, "estimator": {"top_k": 3, "max_iterations": 40, "seed": 1, "batch_size": 64}}
# Never converges (mode all, a half-width no run reaches): runs until cancelled or its 300 s budget.
LONG = {
    "metric": {"name": "accuracy"},
    "estimator": {"mode": "all", "half_width": 1e-6, "truncation": 0, "max_seconds": 300, "batch_size": 32},
}

File = tuple[str, bytes]


def exact_run(seed: int, **budget: float) -> dict:
    """A spec whose result is a function of its seed alone (mode all, a half-width no run reaches, no truncation):
    runs to its ``budget`` (``max_iterations=800``, ``max_seconds=4``…), so an interrupted and resumed run can be
    compared with an uninterrupted one, bit for bit."""
    estimator = {"mode": "all", "half_width": 1e-6, "truncation": 0, **budget, "seed": seed, "batch_size": 32}
    return {"metric": {"name": "accuracy"}, "estimator": estimator}


def post_job(
    client,
    saved: Saved | None = None,
    spec: dict | str = QUICK,
    *,
    model: File | None = None,
    data: File | None = None,
    without: Collection[str] = (),
    key: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """``POST /v1/jobs`` with ``client`` (a ``TestClient`` or an ``httpx.Client``): ``saved``'s ONNX model and
    evaluation set unless ``model`` / ``data`` replace them, the parts named in ``without`` left out, ``spec`` as
    JSON (a string is sent as it is), ``key`` as a bearer token."""
    files = {}
    if "model" not in without:
        files["model"] = model or (saved.onnx.name, saved.onnx.read_bytes())
    if "data" not in without:
        files["data"] = data or (saved.npz.name, saved.npz.read_bytes())
    headers = dict(headers or {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return client.post(
        "/v1/jobs", files=files, data={"spec": spec if isinstance(spec, str) else json.dumps(spec)}, headers=headers
    )


def submit(client, saved: Saved | None = None, spec: dict | str = QUICK, *, expect: int = 202, **parts) -> dict:
    """:func:`post_job`, asserting the status (202 unless ``expect``); returns the answer's body."""
    r = post_job(client, saved, spec, **parts)
    assert r.status_code == expect, r.text
    return r.json()


def problem(r: httpx.Response, status: int, field: str | None = None) -> dict:
    """Assert ``r`` is an RFC 9457 problem document of ``status`` (naming ``field``, if given); returns it."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert {"type", "title", "status", "detail"} <= body.keys() and body["status"] == status
    if field is not None:
        assert body.get("field") == field, body
    return body
