"""Redis or PostgreSQL restarted in the middle of a job: the job still finishes; clients see honest answers meanwhile.

Each test runs a server of its own (on a free port), so that it can be stopped
and started without touching the machine's.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select

from app.core.config import Settings
from app.core.db import migrate
from app.jobs.models import JobNeuron
from app.main import create_app
from neuronshap.client import Client
from tests.harness import stacks
from tests.harness.jobs import exact_run, post_job
from tests.harness.services import REDIS_URL, namespace, postgres_schema
from tests.harness.stacks import free_port

pytestmark = [pytest.mark.service, pytest.mark.slow]
POSTGRES_BIN = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)), None)


def start_redis(port: int, directory) -> None:
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--logfile",
            str(directory / "redis.log"),
        ],
        check=True,
    )
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


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
def test_a_job_survives_a_redis_restart(tmp_path, tiny_cnn):
    port = free_port()
    start_redis(port, tmp_path)
    try:
        with postgres_schema() as url:
            settings = Settings(
                data_dir=tmp_path,
                database_url=url,
                broker_url=f"redis://127.0.0.1:{port}/0",
                redis_url=f"redis://127.0.0.1:{port}/1",
                blob_dir=tmp_path / "blobs",
                migrate_on_start=False,
                **stacks.FAST,
            )
            migrate(url)
            spec = exact_run(2, max_iterations=1500)
            with stacks.worker_process(settings, tmp_path / "worker.log"), TestClient(create_app(settings)) as client:
                stack = stacks.Stack("full", settings, client, tmp_path / "worker.log")
                job = post_job(client, tiny_cnn, spec).json()
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
                after = post_job(client, tiny_cnn, spec | {"estimator": {"top_k": 3, "max_iterations": 8}})
                assert stack.wait(after.json()["id"], ("succeeded", "failed"), timeout=120)["state"] == "succeeded"
                assert client.get("/readyz").status_code == 200
    finally:
        stop_redis(port)


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (initdb, pg_ctl), on a free port, that it may stop and start.

    As root, the server runs as the ``postgres`` user: PostgreSQL refuses to run as root.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="neuronshap-pg-"))
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._pg("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")

    def _pg(self, tool: str, *args: str) -> None:
        command = [f"{POSTGRES_BIN}/{tool}", *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, cwd=self.dir)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg(
            "pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "server.log"), "-o", options, "-w", "start"
        )

    def crash(self) -> None:
        """Stop at once, as a crash or a failover does: connections are cut and nothing is shut down cleanly."""
        self._pg("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.crash()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_for_line(log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not in {log.name} after {timeout}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.mark.skipif(POSTGRES_BIN is None or shutil.which("runuser") is None, reason="needs PostgreSQL's initdb")
def test_a_job_survives_a_postgres_restart(tmp_path, tiny_cnn):
    """The database crashes while a job runs and is still down when the job ends: the worker keeps the result and
    writes it once the database is back; meanwhile the API answers 503 with Retry-After (never a 500) and a client
    polling the job waits the outage out."""
    postgres = PrivatePostgres()
    ns = namespace()
    try:
        postgres.start()
        settings = Settings(
            data_dir=tmp_path,
            database_url=postgres.url,
            broker_url=REDIS_URL,
            redis_url=REDIS_URL,
            blob_dir=tmp_path / "blobs",
            **(stacks.FAST | ns.settings()),
        )
        migrate(postgres.url)
        env = stacks.settings_env(settings) | {"NEURONSHAP_MIGRATE_ON_START": "false"}
        worker_log = tmp_path / "worker.log"
        # Long enough to be running when the database goes; short enough to end while it is still down.
        # max_seconds counts loading and building too (a fresh worker's first job takes seconds to load here).
        spec = exact_run(2, max_seconds=8)
        with stacks.worker_process(settings, worker_log), stacks.api_process(env, tmp_path / "api.log") as (url, _):
            client = Client(url)
            job = client.submit(tiny_cnn.onnx, tiny_cnn.npz, json.dumps(spec))
            while client.job(job["id"])["state"] != "running":
                time.sleep(0.1)
            seen: list[dict] = []
            poller = threading.Thread(target=lambda: seen.append(follow(client, job["id"])), daemon=True)
            poller.start()
            postgres.crash()

            during = httpx.get(f"{url}/v1/jobs/{job['id']}")
            assert during.status_code == 503, during.text
            assert during.headers["content-type"] == "application/problem+json"
            assert during.json()["type"].endswith("/unavailable") and int(during.headers["Retry-After"]) > 0
            assert httpx.get(f"{url}/v1/jobs").status_code == 503
            ready = httpx.get(f"{url}/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("unreachable")
            # The job ends during the outage; its worker holds the result and retries the write.
            wait_for_line(worker_log, "database unavailable", timeout=60)
            time.sleep(1)
            postgres.start()

            poller.join(timeout=120)
            assert seen and seen[0]["state"] == "succeeded", seen
            done = client.job(job["id"])
            assert done["state"] == "succeeded" and done["summary"]["stop_reason"] == "max_seconds"
            players = done["progress"]["players"]
            assert len(client.neurons(job["id"])) == players
            engine = create_engine(postgres.url)
            with engine.connect() as conn:  # written once: exactly one row per neuron
                stored = conn.execute(
                    select(func.count()).select_from(JobNeuron).where(JobNeuron.job_id == job["id"])
                ).scalar_one()
            engine.dispose()
            assert stored == players
            assert "Traceback" not in (tmp_path / "api.log").read_text()
            # Both processes reconnected: a new job runs end to end.
            after = client.submit(
                tiny_cnn.onnx, tiny_cnn.npz, json.dumps(spec | {"estimator": {"top_k": 3, "max_iterations": 8}})
            )
            assert follow(client, after["id"])["state"] == "succeeded"
            assert httpx.get(f"{url}/readyz").status_code == 200
    finally:
        postgres.remove()
        ns.drop()


def follow(client: Client, job_id: str) -> dict:
    """Poll as a pipeline would, through ``Client.job``, until the job ends."""
    while (job := client.job(job_id))["state"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.2)
    return job
