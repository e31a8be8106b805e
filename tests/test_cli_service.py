"""The service as its users run it: ``neuronshap serve`` as a process, driven by ``neuronshap submit|status|neurons``.

Also: stopping the embedded service mid-job loses no work. The job goes back
to the queue at a checkpoint, resumes when the service starts again, and ends
with exactly the values of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from tests.harness.jobs import QUICK, exact_run
from tests.harness.stacks import ROOT, serve

pytestmark = pytest.mark.service  # a served API: `neuronshap serve` as a process


def neuronshap(*args: str, url: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "neuronshap", *args, "--url", url], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_submit_wait_status_and_neurons_against_a_running_service(tmp_path, tiny_cnn):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(QUICK))
    with serve(tmp_path) as url:
        done = neuronshap(
            "submit",
            str(tiny_cnn.onnx),
            str(tiny_cnn.npz),
            "--spec",
            str(spec),
            "--wait",
            "--json",
            "--limit",
            "5",
            url=url,
        )
        assert done.returncode == 0, done.stderr
        top = json.loads(done.stdout)
        assert [n["rank"] for n in top] == [1, 2, 3, 4, 5]
        assert "succeeded" in done.stderr

        job_id = json.loads(
            neuronshap("submit", str(tiny_cnn.onnx), str(tiny_cnn.npz), "--spec", str(spec), "--json", url=url).stdout
        )["id"]
        for _ in range(300):
            status = json.loads(neuronshap("status", job_id, url=url).stdout)
            if status["state"] == "succeeded":
                break
            time.sleep(0.2)
        assert status["state"] == "succeeded"
        listed = neuronshap("neurons", job_id, "--limit", "3", url=url)
        assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 4  # header + 3 rows

        spec.write_text('{"metric": {"name": "f1"}}')
        bad = neuronshap("submit", str(tiny_cnn.onnx), str(tiny_cnn.npz), "--spec", str(spec), url=url)
        assert bad.returncode == 2 and "spec.metric.name" in bad.stderr and "Traceback" not in bad.stderr
        assert bad.stderr.count("spec.metric.name") == 1, bad.stderr  # the field is named once, not twice
        schemeless = neuronshap("status", job_id, url=url.removeprefix("http://"))
        assert schemeless.returncode == 0 and json.loads(schemeless.stdout)["id"] == job_id, schemeless.stderr
        missing = neuronshap("status", "j_nope", url=url)
        assert missing.returncode == 2 and "404" in missing.stderr
    gone = neuronshap("status", job_id, url=url)
    assert gone.returncode == 1 and "cannot reach the service" in gone.stderr


@pytest.mark.slow
def test_stopping_the_service_mid_job_resumes_it_to_the_uninterrupted_result(tmp_path, tiny_cnn):
    spec = exact_run(7, max_iterations=800)
    files = {
        "model": (tiny_cnn.onnx.name, tiny_cnn.onnx.read_bytes()),
        "data": (tiny_cnn.npz.name, tiny_cnn.npz.read_bytes()),
    }
    env = {"NEURONSHAP_CHECKPOINT_INTERVAL_S": "0.2", "NEURONSHAP_PUBLISH_INTERVAL_S": "0.1"}
    with serve(tmp_path, **env) as url:
        job = httpx.post(f"{url}/v1/jobs", files=files, data={"spec": json.dumps(spec)}).json()
        for _ in range(600):
            progress = httpx.get(f"{url}/v1/jobs/{job['id']}").json()["progress"]
            if progress["iterations"] >= 100:
                break
            time.sleep(0.05)
        assert 100 <= progress["iterations"] < 800, "the job should be stopped mid-run"
    # SIGTERM: the job checkpointed and went back to the queue.
    with serve(tmp_path, **env) as url:
        for _ in range(1200):
            resumed = httpx.get(f"{url}/v1/jobs/{job['id']}").json()
            if resumed["state"] == "succeeded":
                break
            time.sleep(0.1)
        assert resumed["state"] == "succeeded" and resumed["progress"]["iterations"] == 800
        assert resumed["summary"]["resumed_from_iteration"] >= 50  # it went on from a checkpoint, not from zero
        fresh = httpx.post(f"{url}/v1/jobs", files=files, data={"spec": json.dumps(spec)}).json()
        for _ in range(1200):
            if httpx.get(f"{url}/v1/jobs/{fresh['id']}").json()["state"] == "succeeded":
                break
            time.sleep(0.1)
        a = httpx.get(f"{url}/v1/jobs/{job['id']}/neurons").json()["items"]
        b = httpx.get(f"{url}/v1/jobs/{fresh['id']}/neurons").json()["items"]
    assert a == b  # the same values, bounds and sample counts, bit for bit
