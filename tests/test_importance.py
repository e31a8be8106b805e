"""``GET /v1/jobs/{id}/importance``: every neuron's value and bounds per layer in index order, live while a job
runs, stored after; a clear 409 while a job has none. On the embedded default and on PostgreSQL + Redis + a
Celery worker process."""

from __future__ import annotations

import time

import pytest

from tests.harness import stacks
from tests.harness.jobs import LONG, QUICK, problem, submit


@pytest.fixture(scope="module", params=["embedded", pytest.param("full", marks=pytest.mark.service)])
def stack(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    with getattr(stacks, request.param)(tmp) as s:
        yield s


def all_neurons(stack, job_id: str) -> dict[tuple[str, int], dict]:
    items = stack.client.get(f"/v1/jobs/{job_id}/neurons", params={"limit": 5000}).json()["items"]
    return {(n["layer"], n["index"]): n for n in items}


def assert_matches_neurons(body: dict, neurons: dict[tuple[str, int], dict]) -> None:
    """Position i of each layer's arrays is that layer's neuron i, with the values /neurons gives it."""
    layers = body["layers"]
    assert sum(len(a["value"]) for a in layers.values()) == len(neurons)
    for name, arrays in layers.items():
        assert set(arrays) >= {"value", "lower", "upper", "status"}
        assert len({len(a) for a in arrays.values()}) == 1  # one length per layer
        for i, value in enumerate(arrays["value"]):
            n = neurons[(name, i)]
            assert (value, arrays["lower"][i], arrays["upper"][i], arrays["status"][i]) == (
                n["value"],
                n["lower"],
                n["upper"],
                n["status"],
            )


def test_importance_live_while_running_stored_after_and_409_without_estimates(stack, tiny_cnn):
    running = submit(stack.client, tiny_cnn, LONG)
    stack.wait(running["id"], ("running",))
    # One job runs at a time (the embedded thread, the worker's solo pool): this one waits behind it.
    queued = submit(stack.client, tiny_cnn, QUICK)
    body = problem(stack.client.get(f"/v1/jobs/{queued['id']}/importance"), 409)
    assert body["type"].endswith("not-ready") and "no estimates" in body["detail"]

    deadline = time.monotonic() + 120
    while (live := stack.client.get(f"/v1/jobs/{running['id']}/importance")).status_code == 409:
        assert time.monotonic() < deadline, "no live estimates after 120 s"
        time.sleep(0.2)
    assert live.status_code == 200, live.text
    layers = live.json()["layers"]
    assert list(layers) == ["conv1", "conv2"] and [len(a["value"]) for a in layers.values()] == [4, 6]

    stack.client.post(f"/v1/jobs/{running['id']}/cancel")
    stack.wait(running["id"], ("cancelled",), timeout=60)
    kept = stack.client.get(f"/v1/jobs/{running['id']}/importance")
    assert kept.status_code == 200  # the cancelled job's partial estimates, from the database
    assert_matches_neurons(kept.json(), all_neurons(stack, running["id"]))

    done = stack.wait(queued["id"], ("succeeded", "failed"))
    assert done["state"] == "succeeded", done["error"]
    final = stack.client.get(f"/v1/jobs/{queued['id']}/importance").json()
    assert list(final["layers"]) == [layer["name"] for layer in done["summary"]["game"]["layers"]]  # model order
    assert_matches_neurons(final, all_neurons(stack, queued["id"]))


def test_a_failed_job_has_no_importance_and_an_unknown_job_is_404(stack, tiny_cnn):
    # A budget spent before any informative sample: the job fails no-evidence and stores no neurons.
    failed = submit(stack.client, tiny_cnn, LONG | {"estimator": LONG["estimator"] | {"max_seconds": 0.01}})
    ended = stack.wait(failed["id"], ("failed", "succeeded", "cancelled"))
    assert ended["state"] == "failed" and ended["error"]["type"] == "no-evidence", ended
    body = problem(stack.client.get(f"/v1/jobs/{failed['id']}/importance"), 409)
    assert "failed" in body["detail"]
    problem(stack.client.get("/v1/jobs/j_00000000000000000000/importance"), 404)
