"""A small HTTP client of the service, for the ``neuronshap`` commands and for pipelines.

It follows a job through its event stream and reconnects with
``Last-Event-ID`` when the connection drops, so a flaky network or an API
restart costs nothing but a moment.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx


class ServiceError(Exception):
    """The service answered with a problem document (or not at all)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait before asking again, for a 503 that says when (``Retry-After``); None for anything else."""
    if response.status_code != 503:
        return None
    try:
        return min(30.0, max(0.0, float(response.headers.get("Retry-After", ""))))
    except ValueError:
        return None


class Client:
    def __init__(
        self, base_url: str, api_key: str | None = None, timeout: float = 60.0, unavailable_s: float = 300.0
    ) -> None:
        """``unavailable_s``: how long requests wait out a service that answers 503 (a database restarting)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.unavailable_s = unavailable_s
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        try:
            problem = response.json()
            detail = problem.get("detail") or problem.get("title") or response.text
            field = problem.get("field")
            if field and field not in detail:  # the detail of a spec error already names its field
                detail = f"{field}: {detail}"
        except ValueError:
            detail = response.text[:500]
        raise ServiceError(response.status_code, f"HTTP {response.status_code}: {detail}")

    def submit(self, model: Path, data: Path, spec: str, idempotency_key: str | None = None) -> dict:
        """Start a job. The request always carries an ``Idempotency-Key`` (a new one unless given), so it is retried
        safely when the connection drops or the service is briefly unavailable: a retry returns the job the first
        attempt made, never a second one."""
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        with open(model, "rb") as m, open(data, "rb") as d:

            def send() -> httpx.Response:
                m.seek(0)
                d.seek(0)
                files = {"model": (Path(model).name, m), "data": (Path(data).name, d)}
                return self.http.post("/v1/jobs", files=files, data={"spec": spec}, headers=headers)

            return self._retrying(send).json()

    def _get(self, path: str, **kwargs) -> httpx.Response:
        return self._retrying(lambda: self.http.get(path, **kwargs))

    def _retrying(self, send: Callable[[], httpx.Response]) -> httpx.Response:
        """Send again when the connection drops or the service says it is briefly unavailable (503 with
        ``Retry-After``, a database restarting), for up to ``unavailable_s``. Only for requests that are safe to
        repeat: reads, and submissions under an idempotency key."""
        deadline = time.monotonic() + self.unavailable_s
        dropped = 0
        while True:
            try:
                response = send()
            except httpx.TransportError:
                dropped += 1
                if dropped > 2:
                    raise
                time.sleep(0.5 * dropped)
                continue
            wait = _retry_after(response)
            if wait is None or time.monotonic() + wait > deadline:
                return self._check(response)
            time.sleep(wait)

    def job(self, job_id: str) -> dict:
        return self._get(f"/v1/jobs/{job_id}").json()

    def neurons(
        self, job_id: str, limit: int | None = None, order: str = "desc", layer: str | None = None
    ) -> list[dict]:
        """Up to ``limit`` ranked neurons (all when None), following the pages."""
        out: list[dict] = []
        cursor = None
        while limit is None or len(out) < limit:
            params = {"order": order, "limit": min(1000, limit - len(out)) if limit else 1000}
            if cursor:
                params["cursor"] = cursor
            if layer:
                params["layer"] = layer
            page = self._get(f"/v1/jobs/{job_id}/neurons", params=params).json()
            out += page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        return out

    def create_edit(self, job_id: str, selection: dict, data: Path | None = None) -> dict:
        """Start an edit of a finished job (docs/API.md, "Acting on a result: edits"), with optional held-out data.

        Sent once, not retried: a second edit of the same selection would be harmless but is not asked for."""
        form = {"selection": json.dumps(selection)}
        if data is None:
            return self._check(self.http.post(f"/v1/jobs/{job_id}/edits", data=form)).json()
        with open(data, "rb") as d:
            files = {"data": (Path(data).name, d)}
            return self._check(self.http.post(f"/v1/jobs/{job_id}/edits", data=form, files=files)).json()

    def edit(self, job_id: str, edit_id: str) -> dict:
        return self._get(f"/v1/jobs/{job_id}/edits/{edit_id}").json()

    def wait_edit(self, job_id: str, edit_id: str, poll_s: float = 0.5) -> dict:
        """Poll the edit until it has succeeded or failed (an edit takes seconds: it has no event stream)."""
        while True:
            edit = self.edit(job_id, edit_id)
            if edit["state"] in ("succeeded", "failed"):
                return edit
            time.sleep(poll_s)

    def edited_model(self, job_id: str, edit_id: str) -> bytes:
        """The edited model as ONNX bytes."""
        return self._get(f"/v1/jobs/{job_id}/edits/{edit_id}/model").content

    def events(self, job_id: str, retries: int = 30) -> Iterator[tuple[str, dict]]:
        """The job's events until ``done``, reconnecting after the last event seen."""
        last_id: str | None = None
        failures = 0
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=None) as response:
                    if not response.is_success:
                        response.read()
                        wait = _retry_after(response)
                        if wait is not None and failures < retries:
                            failures += 1
                            time.sleep(wait)
                            continue
                        self._check(response)
                    kind, data_lines, event_id = None, [], None
                    for line in response.iter_lines():
                        failures = 0
                        if line.startswith("event:"):
                            kind = line[6:].strip()
                        elif line.startswith("data:"):
                            data_lines.append(line[5:].strip())
                        elif line.startswith("id:"):
                            event_id = line[3:].strip()
                        elif line == "" and kind is not None:
                            yield kind, json.loads("\n".join(data_lines) or "{}")
                            last_id = event_id or last_id
                            if kind == "done":
                                return
                            kind, data_lines, event_id = None, [], None
            except (httpx.TransportError, httpx.RemoteProtocolError):
                failures += 1
                if failures > retries:
                    raise
                time.sleep(min(5.0, 0.5 * failures))
