"""API keys and tenants: keys stored as hashes, a tenant sees only its own jobs, a cap on active jobs."""

from __future__ import annotations

import os
import subprocess
import sys

from app.core.db import session_factory
from app.keys.models import ApiKey
from app.keys.service import create_key, revoke_key
from tests.harness import stacks
from tests.harness.jobs import LONG, QUICK, post_job, problem


def test_keys_scope_jobs_to_their_tenant_and_revoked_keys_stop_working(tmp_path, tiny_cnn):
    with stacks.embedded(tmp_path, require_api_keys=True, max_active_jobs_per_tenant=1) as stack:
        with session_factory(stack.settings.resolved_database_url)() as session:
            a_id, a = create_key(session, "team-a")
            _, b = create_key(session, "team-b")
            stored = session.get(ApiKey, a_id)
            assert stored.secret_hash not in a and a.split("_", 2)[2] not in stored.secret_hash  # only a hash

        body = problem(post_job(stack.client, tiny_cnn, QUICK), 401)
        assert "Bearer" in body["detail"]
        assert post_job(stack.client, tiny_cnn, QUICK).headers["WWW-Authenticate"] == "Bearer"
        problem(post_job(stack.client, tiny_cnn, QUICK, key=a[:-2] + "xx"), 401)  # right id, wrong secret
        problem(post_job(stack.client, tiny_cnn, QUICK, key="nsk_000000000000_" + "x" * 43), 401)
        problem(stack.client.get("/v1/jobs"), 401)

        as_a = {"Authorization": f"Bearer {a}"}
        as_b = {"Authorization": f"Bearer {b}"}
        r = post_job(stack.client, tiny_cnn, LONG, key=a)
        assert r.status_code == 202
        job = r.json()
        # Tenant A is at its cap of one active job.
        capped = post_job(stack.client, tiny_cnn, QUICK, key=a)
        problem(capped, 429)
        assert capped.headers["Retry-After"] == "30"
        other = post_job(stack.client, tiny_cnn, QUICK | {"estimator": {"top_k": 3, "max_iterations": 4}}, key=b)
        assert other.status_code == 202

        problem(stack.client.get(f"/v1/jobs/{job['id']}", headers=as_b), 404)  # another tenant's job does not exist
        problem(stack.client.post(f"/v1/jobs/{job['id']}/cancel", headers=as_b), 404)
        problem(stack.client.get(f"/v1/jobs/{job['id']}/neurons", headers=as_b), 404)
        assert job["id"] not in {j["id"] for j in stack.client.get("/v1/jobs", headers=as_b).json()["items"]}
        assert [j["id"] for j in stack.client.get("/v1/jobs", headers=as_a).json()["items"]] == [job["id"]]

        assert stack.client.post(f"/v1/jobs/{job['id']}/cancel", headers=as_a).status_code == 200
        with session_factory(stack.settings.resolved_database_url)() as session:
            assert revoke_key(session, a_id) and not revoke_key(session, a_id)
        problem(stack.client.get(f"/v1/jobs/{job['id']}", headers=as_a), 401)
        assert stack.client.get("/healthz").status_code == 200  # probes need no key


def test_keys_command_creates_and_revokes(tmp_path):
    env = os.environ | {"NEURONSHAP_DATA_DIR": str(tmp_path)}

    def keys(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "neuronshap", "keys", *args],
            cwd=stacks.ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    created = keys("create", "--tenant", "ml-platform", "--name", "nightly")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("nsk_") and "ml-platform" in created.stderr
    assert keys("create", "--tenant", "bad tenant!").returncode == 2
    assert keys("revoke", key.split("_")[1]).returncode == 0
    again = keys("revoke", key.split("_")[1])
    assert again.returncode == 2 and "no active key" in again.stderr
