"""The whole service path, on the embedded default and on PostgreSQL + Redis + a Celery worker process.

Every test runs on both stacks: submit, poll, read the neurons live and
final, follow the event stream, read the ablation curve, list with
pagination, cancel, delete, and every kind of bad input.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from tests.harness import stacks
from tests.harness.jobs import LONG, QUICK, post_job, problem, submit


@pytest.fixture(scope="module", params=["embedded", pytest.param("full", marks=pytest.mark.service)])
def stack(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    with getattr(stacks, request.param)(tmp) as s:
        yield s


def events(stack, job_id: str, last_event_id: str | None = None) -> list[tuple[str | None, str, dict]]:
    """Read the SSE stream to its ``done`` event."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    out, event_id, kind, data = [], None, None, []
    with stack.client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and kind:
                out.append((event_id, kind, json.loads("".join(data))))
                if kind == "done":
                    break
                event_id, kind, data = None, None, []
    return out


def test_a_job_runs_to_its_ranked_neurons_events_and_ablation_check(stack, tiny_cnn):
    r = post_job(stack.client, tiny_cnn, QUICK | {"name": "tiny"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["Location"] == f"/v1/jobs/{job['id']}" == job["links"]["self"]
    assert job["state"] == "queued" and job["spec"]["name"] == "tiny"
    assert job["spec"]["estimator"]["delta"] == 0.05 and job["spec"]["players"]["ablation"] == "zero"  # defaults filled

    done = stack.wait(job["id"], ("succeeded", "failed"))
    assert done["state"] == "succeeded", done["error"]
    assert done["progress"]["iterations"] == 40 and done["progress"]["players"] == 10
    assert done["started_at"] and done["finished_at"] and done["finished_at"].endswith(("Z", "+00:00"))
    for name in ("neurons", "ablation", "importance", "edits", "report"):  # every link of a finished job answers
        assert stack.client.get(done["links"][name]).status_code == 200, name

    page = stack.client.get(f"/v1/jobs/{job['id']}/neurons", params={"limit": 4}).json()
    assert [n["rank"] for n in page["items"]] == [1, 2, 3, 4] and page["next_cursor"]
    rest = stack.client.get(
        f"/v1/jobs/{job['id']}/neurons", params={"limit": 100, "cursor": page["next_cursor"]}
    ).json()
    neurons = page["items"] + rest["items"]
    assert rest["next_cursor"] is None and [n["rank"] for n in neurons] == list(range(1, 11))
    values = [n["value"] for n in neurons]
    assert values == sorted(values, reverse=True)
    assert all(n["lower"] <= n["value"] <= n["upper"] and n["samples"] > 0 for n in neurons)
    assert {n["layer"] for n in neurons} == {"conv1", "conv2"}
    assert sum(n["status"] == "top" for n in neurons) <= 3
    conv2 = stack.client.get(f"/v1/jobs/{job['id']}/neurons", params={"layer": "conv2"}).json()["items"]
    assert len(conv2) == 6 and all(n["layer"] == "conv2" for n in conv2)
    unknown = stack.client.get(f"/v1/jobs/{job['id']}/neurons", params={"layer": "conv9"})
    assert unknown.status_code == 400 and unknown.json()["field"] == "layer"
    assert "conv1, conv2" in unknown.json()["detail"]  # the names to choose from
    ascending = stack.client.get(f"/v1/jobs/{job['id']}/neurons", params={"order": "asc", "limit": 2}).json()
    assert [n["rank"] for n in ascending["items"]] == [10, 9]

    curve = stack.client.get(f"/v1/jobs/{job['id']}/ablation").json()
    assert curve["k"][0] == 0 and len(curve["top"]) == len(curve["random"]) == len(curve["bottom"])
    assert curve["top"][0] == pytest.approx(done["progress"]["v_full"], abs=0.05)  # nothing removed: the intact model
    assert curve["k"] == [0, 1, 2, 3, 4, 5]  # at most half the neurons
    assert sum(curve["top"]) < sum(curve["random"])  # the neurons ranked top matter more than random ones
    assert [(n["layer"], n["index"]) for n in neurons[: len(curve["removed_top"])]] == [
        (n["layer"], n["index"]) for n in curve["removed_top"]
    ]

    stream = events(stack, job["id"])
    kinds = [k for _, k, _ in stream]
    assert kinds[0] == "state" and stream[0][2] == {"state": "queued"}
    assert {"running"} <= {d.get("state") for _, k, d in stream if k == "state"}
    assert "progress" in kinds and "bounds" in kinds and kinds[-1] == "done" and stream[-1][2] == {"state": "succeeded"}
    middle = len(stream) // 2
    resumed = events(stack, job["id"], last_event_id=stream[middle][0])
    assert resumed == stream[middle + 1 :]  # Last-Event-ID resumes right after that event


def test_live_neurons_while_running_then_cancel_keeps_partial_results_and_delete_removes_all(stack, tiny_cnn):
    job = submit(stack.client, tiny_cnn, LONG)
    stack.wait(job["id"], ("running",))
    deadline_job = None
    for _ in range(200):  # until the worker has published live bounds
        live = stack.client.get(f"/v1/jobs/{job['id']}/neurons").json()["items"]
        deadline_job = stack.client.get(f"/v1/jobs/{job['id']}").json()
        if live and deadline_job["progress"]["iterations"] > 0:
            break
        stack.wait(job["id"], ("running",))
    assert live and len(live) == 10 and deadline_job["state"] == "running"
    assert deadline_job["progress"]["iterations"] > 0 and deadline_job["progress"]["players"] == 10
    problem(stack.client.delete(f"/v1/jobs/{job['id']}"), 409)  # cannot delete a running job
    problem(stack.client.get(f"/v1/jobs/{job['id']}/ablation"), 409)

    r = stack.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] in ("cancelling", "cancelled")
    assert stack.client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200  # idempotent
    ended = stack.wait(job["id"], ("cancelled",), timeout=30)
    assert ended["finished_at"]
    partial = stack.client.get(f"/v1/jobs/{job['id']}/neurons").json()["items"]
    assert len(partial) == 10 and all(n["samples"] > 0 for n in partial)  # partial estimates stay readable
    assert events(stack, job["id"])[-1][1:] == ("done", {"state": "cancelled"})

    assert stack.client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    problem(stack.client.get(f"/v1/jobs/{job['id']}"), 404)
    problem(stack.client.get(f"/v1/jobs/{job['id']}/neurons"), 404)
    problem(stack.client.delete(f"/v1/jobs/{job['id']}"), 404)


def test_cancelling_a_queued_job_ends_it_and_a_finished_job_cannot_be_cancelled(stack, tiny_cnn):
    blocker = submit(stack.client, tiny_cnn, LONG)  # one job at a time per worker: the next one waits in the queue
    stack.wait(blocker["id"], ("running",))
    queued = submit(stack.client, tiny_cnn, QUICK)
    r = stack.client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    stack.client.post(f"/v1/jobs/{blocker['id']}/cancel")
    stack.wait(blocker["id"], ("cancelled",), timeout=30)
    assert stack.client.get(f"/v1/jobs/{queued['id']}").json()["started_at"] is None  # the worker skipped it

    done = submit(stack.client, tiny_cnn, QUICK)
    stack.wait(done["id"], ("succeeded",))
    problem(stack.client.post(f"/v1/jobs/{done['id']}/cancel"), 409)


def test_jobs_are_listed_newest_first_in_pages(stack, tiny_cnn):
    ids = [submit(stack.client, tiny_cnn, QUICK | {"name": f"page-{i}"})["id"] for i in range(3)]
    for job_id in ids:
        stack.wait(job_id, ("succeeded",))
    first = stack.client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["items"]] == ids[::-1][:2] and first["next_cursor"]
    seen = [j["id"] for j in first["items"]]
    cursor = first["next_cursor"]
    while cursor:
        page = stack.client.get("/v1/jobs", params={"limit": 2, "cursor": cursor}).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
    assert len(seen) == len(set(seen)) and seen[:3] == ids[::-1]
    succeeded = stack.client.get("/v1/jobs", params={"state": "succeeded", "limit": 500}).json()["items"]
    assert set(ids) <= {j["id"] for j in succeeded} and all(j["state"] == "succeeded" for j in succeeded)

    problem(stack.client.get("/v1/jobs", params={"cursor": "bm90IGEgY3Vyc29y.AAAA"}), 400, "cursor")
    # A cursor is bound to its list: one from the unfiltered list does not page the filtered one.
    problem(stack.client.get("/v1/jobs", params={"cursor": first["next_cursor"], "state": "failed"}), 400, "cursor")
    problem(stack.client.get("/v1/jobs", params={"state": "sleeping"}), 422, "state")
    problem(stack.client.get("/v1/jobs", params={"limit": 0}), 422, "limit")


def test_idempotency_key_returns_the_same_job_and_refuses_another_payload(stack, tiny_cnn):
    key = {"Idempotency-Key": f"retry-{stack.kind}"}
    first = submit(stack.client, tiny_cnn, QUICK, headers=key)
    again = submit(stack.client, tiny_cnn, QUICK, headers=key)
    assert again["id"] == first["id"]
    other = post_job(
        stack.client,
        tiny_cnn,
        QUICK | {"name": "other"},
        model=("m.onnx", tiny_cnn.onnx.read_bytes()),
        data=("d.npz", tiny_cnn.npz.read_bytes()),
        headers=key,
    )
    body = problem(other, 422)
    assert first["id"] in body["detail"]
    stack.wait(first["id"], ("succeeded",))


@pytest.mark.parametrize("kind", ["embedded", pytest.param("full", marks=pytest.mark.service)])
def test_errors_found_by_the_worker_fail_the_job_with_a_message_not_a_trace(kind, tiny_cnn, tmp_path):
    """The worker keeps its own checks (a model may reach it unchecked: the submission check off, or out of
    time); tests/test_preflight.py has the same mistakes refused at submission."""
    with getattr(stacks, kind)(tmp_path, preflight_timeout_s=0) as stack:
        no_layer = submit(stack.client, tiny_cnn, {"metric": {"name": "accuracy"}, "players": {"layers": ["block9.*"]}})
        # Inputs of another shape than the model takes: found when the worker runs the model.
        x = np.zeros((20, 1, 5, 5), dtype=np.float32)
        buf = io.BytesIO()
        np.savez(buf, inputs=x, labels=np.zeros(20, dtype=np.int64))
        wrong_shape = submit(stack.client, tiny_cnn, QUICK, data=("eval.npz", buf.getvalue()))
        top_k = submit(stack.client, tiny_cnn, {"metric": {"name": "accuracy"}, "estimator": {"top_k": 50}})
        for job, needle in ((no_layer, "block9"), (wrong_shape, "size"), (top_k, "top_k")):
            failed = stack.wait(job["id"], ("failed", "succeeded"))
            assert failed["state"] == "failed", failed
            assert needle in failed["error"]["detail"], failed["error"]
            assert "Traceback" not in failed["error"]["detail"] and failed["error"]["type"].endswith("error")
            assert events(stack, job["id"])[-1][1:] == ("done", {"state": "failed"})


def test_bad_requests_get_problem_documents_naming_the_field(stack, tiny_cnn, tmp_path):
    onnx = (tiny_cnn.onnx.name, tiny_cnn.onnx.read_bytes())
    npz = (tiny_cnn.npz.name, tiny_cnn.npz.read_bytes())

    quick = json.dumps(QUICK)

    def post(spec=quick, model=onnx, data=npz):
        return post_job(stack.client, spec=spec, model=model, data=data)

    assert "valid JSON" in problem(post(spec="{metric"), 422, "spec")["detail"]
    assert "accuracy" in problem(post(spec='{"metric": {"name": "f1"}}'), 422, "spec.metric.name")["detail"]
    problem(post(spec='{"metric": {"name": "accuracy"}, "colour": 1}'), 422, "spec.colour")
    problem(post(spec='{"metric": {"name": "class_recall"}}'), 422, "spec.metric")
    problem(post(spec='{"metric": {"name": "accuracy"}, "estimator": {"delta": 2}}'), 422, "spec.estimator.delta")
    problem(post(spec="{}"), 422, "spec.metric")
    problem(post_job(stack.client, tiny_cnn, without=("data",)), 422, "data")

    assert "ONNX" in problem(post(model=("model.txt", b"hello")), 415, "model")["detail"]
    assert "pickle" in problem(post(model=("model.pt", b"\x80\x04K\x01.")), 415, "model")["detail"]
    problem(post(model=("model.onnx", b"not a model")), 422, "model")
    assert "ALLOW_PICKLE" in problem(post(model=("model.pt2", tiny_cnn.pt2.read_bytes())), 415, "model")["detail"]
    problem(post(model=("model.onnx", b"")), 422, "model")

    problem(post(data=("eval.csv", b"1,2,3")), 415, "data")
    problem(post(data=("eval.npz", b"PK\x03\x04 truncated")), 422, "data")
    no_labels = io.BytesIO()
    np.savez(no_labels, inputs=np.zeros((4, 1, 8, 8), np.float32))
    assert "`labels`" in problem(post(data=("eval.npz", no_labels.getvalue())), 422, "data")["detail"]
    short = io.BytesIO()
    np.savez(short, inputs=np.zeros((4, 1, 8, 8), np.float32), labels=np.zeros(3, np.int64))
    problem(post(data=("eval.npz", short.getvalue())), 422, "data")
    objects = io.BytesIO()
    np.savez(objects, inputs=np.array([None] * 4, dtype=object), labels=np.zeros(4, np.int64))
    problem(post(data=("eval.npz", objects.getvalue())), 422, "data")

    problem(stack.client.get("/v1/jobs/j_nope"), 404)
    problem(stack.client.post("/v1/jobs/j_nope/cancel"), 404)
    problem(stack.client.get("/v1/jobs/j_nope/events"), 404)
    problem(stack.client.get("/v2/anything"), 404)
    job = submit(stack.client, tiny_cnn, QUICK)
    problem(stack.client.get(f"/v1/jobs/{job['id']}/neurons", params={"cursor": "x.y"}), 400, "cursor")
    problem(
        stack.client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "yesterday"}), 400, "Last-Event-ID"
    )
    stack.wait(job["id"], ("succeeded",))


def test_uploads_over_the_limit_are_refused_with_413(tmp_path, tiny_cnn):
    with stacks.embedded(tmp_path, max_model_bytes=1000) as small:
        r = post_job(small.client, tiny_cnn, model=("m.onnx", b"\x08" + b"0" * 5000))
        assert "1000 bytes" in problem(r, 413, "model")["detail"]
        assert not any(p.is_file() for p in small.settings.resolved_blob_dir.rglob("*"))  # nothing half-stored


def test_health_readiness_metrics_and_openapi(stack):
    assert stack.client.get("/healthz").json() == {"status": "ok"}
    ready = stack.client.get("/readyz")
    assert ready.status_code == 200 and set(ready.json()["checks"].values()) == {"ok"}
    metrics = stack.client.get("/metrics").text
    assert "neuronshap_jobs{" in metrics and "neuronshap_http_requests_total{" in metrics
    paths = stack.client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/neurons",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/ablation",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path


def test_readiness_reports_an_unreachable_redis(tmp_path):
    with stacks.embedded(tmp_path, redis_url="redis://127.0.0.1:1/0") as broken:
        ready = broken.client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("unreachable")
