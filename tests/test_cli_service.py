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
import onnxruntime
import pytest

from tests.harness.jobs import QUICK, exact_run
from tests.harness.stacks import ROOT, serve

pytestmark = pytest.mark.service  # a served API: `neuronshap serve` as a process


# A submission runs the submission check (a forked torch process: seconds, more on a loaded box; its own limit is
# NEURONSHAP_PREFLIGHT_TIMEOUT_S, 60 s), so it gets the project client's timeout, not httpx's 5 s.
SUBMIT_S = 60.0


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
        job = httpx.post(f"{url}/v1/jobs", files=files, data={"spec": json.dumps(spec)}, timeout=SUBMIT_S).json()
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
        fresh = httpx.post(f"{url}/v1/jobs", files=files, data={"spec": json.dumps(spec)}, timeout=SUBMIT_S).json()
        for _ in range(1200):
            if httpx.get(f"{url}/v1/jobs/{fresh['id']}").json()["state"] == "succeeded":
                break
            time.sleep(0.1)
        a = httpx.get(f"{url}/v1/jobs/{job['id']}/neurons").json()["items"]
        b = httpx.get(f"{url}/v1/jobs/{fresh['id']}/neurons").json()["items"]
    assert a == b  # the same values, bounds and sample counts, bit for bit


@pytest.mark.slow
def test_edit_prints_before_and_after_and_writes_the_model_and_report_prints_the_page(tmp_path, tiny_cnn):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(QUICK))
    held_out = tmp_path / "held_out.npz"
    held_out.write_bytes(tiny_cnn.npz.read_bytes())  # the job's own examples, as a file of the user's
    with serve(tmp_path) as url:
        submitted = neuronshap(
            "submit", str(tiny_cnn.onnx), str(tiny_cnn.npz), "--spec", str(spec), "--wait", "--json", url=url
        )
        assert submitted.returncode == 0, submitted.stderr
        job_id = httpx.get(f"{url}/v1/jobs").json()["items"][0]["id"]

        out = tmp_path / "edited.onnx"
        edited = neuronshap("edit", job_id, "--repair", "3", "--data", str(held_out), "--out", str(out), url=url)
        assert edited.returncode == 0, edited.stderr
        lines = edited.stdout.splitlines()
        assert lines[0].startswith("removed ") and lines[1].split() == ["accuracy", "before", "after", "change"]
        assert [line[:18].rstrip() for line in lines[2:]] == [
            "job's data",
            "  group 0 accuracy",
            "  group 1 accuracy",
            "held-out data",
            "  group 0 accuracy",
            "  group 1 accuracy",
        ]
        edit = httpx.get(f"{url}/v1/jobs/{job_id}/edits").json()["items"][0]
        session = onnxruntime.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
        scores = session.run(None, {session.get_inputs()[0].name: tiny_cnn.x.numpy()})[0]
        accuracy = float((scores.argmax(-1) == tiny_cnn.y.numpy()).mean())
        assert accuracy == pytest.approx(edit["metrics"]["job_data"]["after"], abs=1e-12)
        assert f"{edit['metrics']['job_data']['after']:.4f}" in lines[2]

        pruned = neuronshap("edit", job_id, "--prune", "0.3", "--json", "--out", str(tmp_path / "p.onnx"), url=url)
        assert pruned.returncode == 0, pruned.stderr
        assert len(json.loads(pruned.stdout)["removed"]) == 3

        no_data = neuronshap("edit", job_id, "--repair", "3", url=url)
        assert no_data.returncode == 2 and "--data" in no_data.stderr
        too_many = neuronshap("edit", job_id, "--top", "99", url=url)
        assert too_many.returncode == 2 and "selection.top" in too_many.stderr

        report = neuronshap("report", job_id, url=url)
        assert report.returncode == 0, report.stderr
        page = report.stdout.strip()
        assert page == f"{url}/v1/jobs/{job_id}/report"
        assert httpx.get(page).headers["content-type"].startswith("text/html")
        assert neuronshap("report", "j_missing", url=url).returncode == 2
