"""Redis restarted in the middle of a job: the job still finishes, and clients see honest answers meanwhile.

Uses a Redis server of its own (on a free port) so that it can be stopped and
started without touching the machine's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
import redis
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.db import migrate
from app.main import create_app
from tests import stacks
from tests.conftest import postgres_schema
from tests.stacks import free_port

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")


def start_redis(port: int, directory) -> None:
    subprocess.run(["redis-server", "--daemonize", "yes", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(directory), "--logfile", str(directory / "redis.log")], check=True)
    for _ in range(100):
        try:
            redis.Redis(port=port).ping()
            return
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis did not start")


def stop_redis(port: int) -> None:
    try:
        redis.Redis(port=port).shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # shutting down closes the connection that asked


def test_a_job_survives_a_redis_restart(tmp_path, tiny_cnn):
    port = free_port()
    start_redis(port, tmp_path)
    try:
        with postgres_schema() as url:
            settings = Settings(data_dir=tmp_path, database_url=url, broker_url=f"redis://127.0.0.1:{port}/0",
                                redis_url=f"redis://127.0.0.1:{port}/1", blob_dir=tmp_path / "blobs",
                                migrate_on_start=False, **stacks.FAST)
            migrate(url)
            spec = {"metric": {"name": "accuracy"},
                    "estimator": {"mode": "all", "half_width": 1e-6, "truncation": 0, "max_iterations": 1500,
                                  "seed": 2, "batch_size": 32}}
            files = {"model": (tiny_cnn.onnx.name, tiny_cnn.onnx.read_bytes()),
                     "data": (tiny_cnn.npz.name, tiny_cnn.npz.read_bytes())}
            with stacks.worker_process(settings, tmp_path / "worker.log"), \
                    TestClient(create_app(settings)) as client:
                stack = stacks.Stack("full", settings, client, tmp_path / "worker.log")
                job = client.post("/v1/jobs", files=files, data={"spec": json.dumps(spec)}).json()
                stack.wait(job["id"], ("running",))
                stop_redis(port)
                # Meanwhile: honest answers from the database, never a 500.
                during = client.get(f"/v1/jobs/{job['id']}")
                assert during.status_code == 200 and during.json()["state"] in ("running", "succeeded")
                assert client.get(f"/v1/jobs/{job['id']}/neurons").status_code == 200
                ready = client.get("/readyz")
                assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("unreachable")
                time.sleep(2)
                start_redis(port, tmp_path)
                done = stack.wait(job["id"], ("succeeded", "failed"), timeout=180)
                assert done["state"] == "succeeded" and done["progress"]["iterations"] == 1500
                # The worker is back on the broker: a new job runs.
                after = client.post("/v1/jobs", files=files,
                                    data={"spec": json.dumps(spec | {"estimator": {"top_k": 3, "max_iterations": 8}})})
                assert stack.wait(after.json()["id"], ("succeeded", "failed"), timeout=120)["state"] == "succeeded"
                assert client.get("/readyz").status_code == 200
    finally:
        stop_redis(port)
