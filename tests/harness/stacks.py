"""The service assembled for tests: the embedded default, or PostgreSQL + Redis + a Celery worker process.

The API runs in the test process (``TestClient``); in the full stack the
worker is a separate ``neuronshap worker`` process talking to the same
PostgreSQL schema, Redis namespace (``services.namespace``: a key prefix and
a Celery queue of the stack's own) and blob directory, as in production. The
served API (``api_process``, ``serve``) is ``neuronshap serve`` as a process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.db import migrate
from neuronshap.server import create_server_app
from tests.harness.services import full_settings, namespace, postgres_schema

FAST = {"publish_interval_s": 0.2, "cancel_poll_s": 0.2, "checkpoint_interval_s": 1.0}
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    kind: str
    settings: Settings
    client: TestClient
    worker_log: Path | None = None

    def wait(self, job_id: str, states: tuple[str, ...], timeout: float = 120.0) -> dict:
        """Poll the job until it is in one of ``states``; fails with the worker's log on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.client.get(f"/v1/jobs/{job_id}").json()
            if job["state"] in states:
                return job
            if time.monotonic() > deadline:
                log = self.worker_log.read_text()[-3000:] if self.worker_log else ""
                raise AssertionError(f"job {job_id} still {job['state']} after {timeout}s (wanted {states})\n{log}")
            time.sleep(0.1)


@contextlib.contextmanager
def embedded(tmp: Path, **overrides) -> Iterator[Stack]:
    settings = Settings(data_dir=tmp, **(FAST | overrides))
    with TestClient(create_server_app(settings)) as client:
        yield Stack("embedded", settings, client)


@contextlib.contextmanager
def full(tmp: Path, *, worker: bool = True, **overrides) -> Iterator[Stack]:
    """PostgreSQL (a fresh schema), Redis (a namespace of this stack's own, dropped afterwards) and, unless
    ``worker`` is false (the test starts its workers itself), a real Celery worker process."""
    ns = namespace()
    try:
        with postgres_schema() as database_url:
            settings = full_settings(tmp, database_url, ns, **(FAST | overrides))
            migrate(database_url)
            log = tmp / "worker.log"
            with worker_process(settings, log) if worker else contextlib.nullcontext():
                # The API as `neuronshap serve` assembles it: with a broker, that is the submission check and Celery.
                with TestClient(create_server_app(settings)) as client:
                    yield Stack("full", settings, client, log)
    finally:
        ns.drop()


def settings_env(settings: Settings) -> dict[str, str]:
    env = {}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"NEURONSHAP_{name.upper()}"] = str(value)
    return env


@contextlib.contextmanager
def worker_process(settings: Settings, log: Path) -> Iterator[subprocess.Popen]:
    """``neuronshap worker`` in its own process; returns once Celery says it is ready."""
    env = os.environ | settings_env(settings) | {"PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "neuronshap", "worker"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 90
        while b" ready." not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield proc
    finally:
        stop(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def api_process(env: dict[str, str], log: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """``neuronshap serve`` in its own process with ``env`` added; yields (its URL, the process) once ready."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "neuronshap", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=os.environ | {"PYTHONUNBUFFERED": "1"} | env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url, proc
    finally:
        stop(proc)


@contextlib.contextmanager
def serve(data_dir: Path, **env: str) -> Iterator[str]:
    """The embedded service on ``data_dir`` as its own process (``env`` added); yields its URL."""
    with api_process({"NEURONSHAP_DATA_DIR": str(data_dir)} | env, data_dir / "serve.log") as (url, _):
        yield url


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
