"""Edits over HTTP, on the embedded default and on PostgreSQL + Redis + a Celery worker process.

A finished job of the tiny CNN (BatchNorm, two layers, ink groups in its data)
is edited with every kind of selection; each edited ONNX file, run under
onnxruntime on the job's data, gives exactly the edit's ``after`` (overall and
per group); ``negative`` removes exactly the certified-negative neurons;
``repair`` never ends worse on held-out data than it started. Bad input is a
4xx problem naming its field, an edit of a running or failed job a 409, a
failed edit leaves its job as it was, and an edit whose worker died is sent
again by the reconciler.
"""

from __future__ import annotations

import io
import json
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import onnxruntime
import pytest

from app.core.db import session_factory
from app.edits import lifecycle
from app.edits.models import Edit
from app.jobs.recovery import reconcile
from app.jobs.states import JobState
from app.keys.service import create_key
from examples.digits import ink_groups
from tests.harness import stacks
from tests.harness.jobs import LONG, exact_run, problem, submit

SPEC = {"metric": {"name": "accuracy"}, "estimator": {"mode": "all", "max_iterations": 30, "seed": 1, "batch_size": 64}}


@pytest.fixture(scope="module", params=["embedded", pytest.param("full", marks=pytest.mark.service)])
def stack(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    with getattr(stacks, request.param)(tmp) as s:
        yield s


@pytest.fixture(scope="module")
def job(stack, tiny_cnn) -> dict:
    """A succeeded job of the tiny CNN, with its ranked neurons (highest value first)."""
    job = submit(stack.client, tiny_cnn, SPEC)
    done = stack.wait(job["id"], ("succeeded", "failed"))
    assert done["state"] == "succeeded", done["error"]
    done["neurons"] = stack.client.get(f"/v1/jobs/{job['id']}/neurons", params={"limit": 1000}).json()["items"]
    return done


@pytest.fixture(scope="module")
def held_out(digits) -> tuple[str, bytes]:
    """Digits the job never saw, with their ink groups: the job's data format."""
    _, _, x_te, y_te = digits
    x, y = x_te[150:], y_te[150:]
    buf = io.BytesIO()
    np.savez(buf, inputs=x.numpy(), labels=y.numpy(), groups=ink_groups(x).numpy())
    return "held_out.npz", buf.getvalue()


def post_edit(stack, job_id: str, selection: dict | str, data: tuple[str, bytes] | None = None):
    text = selection if isinstance(selection, str) else json.dumps(selection)
    return stack.client.post(
        f"/v1/jobs/{job_id}/edits", data={"selection": text}, files={"data": data} if data else None
    )


def wait_edit(stack, job_id: str, edit_id: str) -> dict:
    """Poll the edit until it has succeeded or failed (the stack's worker log on a timeout)."""
    deadline = time.monotonic() + 120
    while True:
        edit = stack.client.get(f"/v1/jobs/{job_id}/edits/{edit_id}").json()
        if edit["state"] in ("succeeded", "failed"):
            return edit
        if time.monotonic() > deadline:
            log = stack.worker_log.read_text()[-3000:] if stack.worker_log else ""
            raise AssertionError(f"edit {edit_id} still {edit['state']}\n{log}")
        time.sleep(0.1)


def onnx_figures(model: bytes, saved) -> dict:
    """Accuracy and each ink group's accuracy of an ONNX file on the job's data, as an edit reports them."""
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    x = saved.x.numpy()
    scores = session.run(None, {session.get_inputs()[0].name: x})[0]
    correct = scores.reshape(len(x), -1).argmax(-1) == saved.y.numpy()
    groups = ink_groups(saved.x).numpy()
    return {
        "after": float(correct.mean()),
        "groups": {str(g): float(correct[groups == g].mean()) for g in np.unique(groups)},
    }


def names(neurons: list[dict]) -> list[tuple[str, int]]:
    return [(n["layer"], n["index"]) for n in neurons]


def test_every_selection_runs_on_a_worker_and_the_edited_model_reproduces_its_figures(stack, job, tiny_cnn, held_out):
    ranked = job["neurons"]
    selections = {
        "neurons": ({"neurons": [{"layer": "conv1", "index": 1}, {"layer": "conv2", "index": 0}]}, None),
        "top": ({"top": 2}, None),
        "bottom": ({"bottom": 2}, None),
        "negative": ({"negative": True}, None),
        "prune": ({"prune": {"fraction": 0.3}}, None),
        "repair": ({"repair": {"max_neurons": 4}}, held_out),
    }
    posted = {}
    for kind, (selection, data) in selections.items():
        r = post_edit(stack, job["id"], selection, data)
        assert r.status_code == 202, r.text
        edit = r.json()
        assert edit["id"].startswith("e_") and edit["job_id"] == job["id"] and edit["state"] == "queued"
        assert r.headers["Location"] == edit["links"]["self"] == f"/v1/jobs/{job['id']}/edits/{edit['id']}"
        assert edit["selection"] == selection and edit["removed"] is None
        posted[kind] = edit["id"]

    edits = {kind: wait_edit(stack, job["id"], edit_id) for kind, edit_id in posted.items()}
    unedited = onnx_figures(tiny_cnn.onnx.read_bytes(), tiny_cnn)
    for kind, edit in edits.items():
        assert edit["state"] == "succeeded", (kind, edit["error"])
        assert edit["metric"] == "accuracy" and edit["ablation"] == "zero"
        r = stack.client.get(edit["links"]["model"])
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        assert r.headers["content-disposition"].endswith(f'{job["id"]}-{edit["id"]}.onnx"')
        figures = edit["metrics"]["job_data"]
        assert figures["before"] == pytest.approx(unedited["after"], abs=1e-12)
        assert onnx_figures(r.content, tiny_cnn) == {
            "after": pytest.approx(figures["after"], abs=1e-12),
            "groups": {g: pytest.approx(v["after"], abs=1e-12) for g, v in figures["groups"].items()},
        }, kind

    assert names(edits["neurons"]["removed"]) == [("conv1", 1), ("conv2", 0)]
    assert names(edits["top"]["removed"]) == names(ranked[:2])
    assert names(edits["bottom"]["removed"]) == names(ranked[::-1][:2])
    negative = {(n["layer"], n["index"]) for n in ranked if n["upper"] < 0}
    assert set(names(edits["negative"]["removed"])) == negative  # exactly the certified-negative ones
    assert names(edits["prune"]["removed"]) == names(ranked[::-1][:3])  # ⌊0.3 × 10⌋ lowest
    assert [p["removed"] for p in edits["prune"]["curve"]] == [0, 1, 2, 3]
    assert edits["prune"]["metrics"]["held_out"] is None

    repair = edits["repair"]
    kept = len(repair["removed"])
    assert names(repair["removed"]) == names(ranked[::-1][:kept]) and kept <= 4
    held = repair["metrics"]["held_out"]
    assert held["after"] >= held["before"] and set(held["groups"]) == {"0", "1"}
    assert held["after"] == max(p["held_out"] for p in repair["curve"])
    assert [p["removed"] for p in repair["curve"]] == [0, 1, 2, 3, 4]

    plan = stack.client.get(edits["neurons"]["links"]["pruning_plan"]).json()
    assert plan == {"layers": {"conv1": [1], "conv2": [0]}, "removed": edits["neurons"]["removed"]}

    listed = stack.client.get(f"/v1/jobs/{job['id']}/edits", params={"limit": 4}).json()
    rest = stack.client.get(f"/v1/jobs/{job['id']}/edits", params={"cursor": listed["next_cursor"]}).json()
    assert rest["next_cursor"] is None
    ids = [e["id"] for e in listed["items"] + rest["items"]]
    assert set(posted.values()) <= set(ids) and len(ids) == len(set(ids))


def blobs(stack) -> set[str]:
    return {p.name for p in stack.settings.resolved_blob_dir.rglob("*.bin")}


def test_bad_edits_are_problems_naming_the_field_and_leave_nothing_behind(stack, job, held_out):
    before = blobs(stack)
    count = len(stack.client.get(f"/v1/jobs/{job['id']}/edits", params={"limit": 500}).json()["items"])
    wrong_shape = io.BytesIO()
    np.savez(wrong_shape, inputs=np.zeros((20, 1, 5, 5), np.float32), labels=np.zeros(20, np.int64))
    cases = [
        ("{top: 2", None, "selection", "JSON"),
        ({"top": 2, "bottom": 2}, None, "selection", "exactly one"),
        ({"best": 2}, None, "selection", "exactly one"),
        ({"top": 0}, None, "selection.top", "greater than or equal to 1"),
        ({"top": 11}, None, "selection.top", "10 neurons"),
        ({"top": True}, None, "selection.top", "integer"),
        ({"negative": False}, None, "selection.negative", "true"),
        ({"negative": 1}, None, "selection.negative", "boolean"),
        ({"neurons": []}, None, "selection.neurons", "at least one"),
        ({"neurons": [{"layer": "conv9", "index": 0}]}, None, "selection.neurons.0.layer", "conv1, conv2"),
        ({"neurons": [{"layer": "conv2", "index": 6}]}, None, "selection.neurons.0.index", "0..5"),
        ({"neurons": [{"layer": "conv2", "index": 1}] * 2}, None, "selection.neurons", "twice"),
        ({"prune": {"fraction": 0.01}}, None, "selection.prune.fraction", "removes none"),
        ({"prune": {"fraction": 0.5, "count": 2}}, None, "selection.prune", "exactly one"),
        ({"repair": {"max_neurons": 3}}, None, "data", "held-out"),
        ({"top": 1}, ("eval.npz", wrong_shape.getvalue()), "data", "held-out data"),
        ({"top": 1}, ("eval.csv", b"1,2,3"), "data", ".npz"),
    ]
    for selection, data, field, needle in cases:
        r = post_edit(stack, job["id"], selection, data)
        body = problem(r, r.status_code, field)
        assert 400 <= r.status_code < 500 and needle in body["detail"], (selection, body)
        if data is not None and data[0] == "eval.npz":  # refused by the submission check, as a job's data would be
            assert body["type"].endswith("/data-error") and "shape" in body["detail"], body
    problem(post_edit(stack, "j_missing", {"top": 1}), 404)
    problem(stack.client.get(f"/v1/jobs/{job['id']}/edits/e_missing"), 404)
    problem(stack.client.get(f"/v1/jobs/{job['id']}/edits/e_missing/model"), 404)
    assert len(stack.client.get(f"/v1/jobs/{job['id']}/edits", params={"limit": 500}).json()["items"]) == count
    assert blobs(stack) == before  # refused uploads are deleted, the job's own files kept


@pytest.mark.slow
def test_only_a_job_with_estimates_can_be_edited(stack, tiny_cnn):
    failed = submit(stack.client, tiny_cnn, exact_run(1, max_seconds=0.01))
    assert stack.wait(failed["id"], ("failed", "succeeded"))["state"] == "failed"
    body = problem(post_edit(stack, failed["id"], {"top": 1}), 409)
    assert "failed" in body["detail"]

    running = submit(stack.client, tiny_cnn, LONG)
    while stack.client.get(f"/v1/jobs/{running['id']}").json()["progress"]["iterations"] == 0:
        time.sleep(0.1)  # running, with estimates to keep when it is cancelled
    assert "running" in problem(post_edit(stack, running["id"], {"top": 1}), 409)["detail"]
    stack.client.post(f"/v1/jobs/{running['id']}/cancel")
    assert stack.wait(running["id"], ("cancelled",))["state"] == "cancelled"
    r = post_edit(stack, running["id"], {"bottom": 1})  # cancelled with estimates: those can be edited
    assert r.status_code == 202, r.text
    assert wait_edit(stack, running["id"], r.json()["id"])["state"] == "succeeded"


def test_a_failed_edit_leaves_the_job_untouched(stack, job):
    """Held-out data of another shape, past a service without the submission check: the worker fails the edit."""
    wrong_shape = io.BytesIO()
    np.savez(wrong_shape, inputs=np.zeros((20, 1, 5, 5), np.float32), labels=np.zeros(20, np.int64))
    before = stack.client.get(f"/v1/jobs/{job['id']}").json()
    check, stack.client.app.state.check_upload = stack.client.app.state.check_upload, None
    try:
        r = post_edit(stack, job["id"], {"top": 1}, ("eval.npz", wrong_shape.getvalue()))
    finally:
        stack.client.app.state.check_upload = check
    assert r.status_code == 202, r.text
    edit = wait_edit(stack, job["id"], r.json()["id"])
    assert edit["state"] == "failed" and edit["removed"] is None and edit["metrics"] is None
    assert edit["error"]["type"] == "data-error" and edit["error"]["field"] == "data", edit["error"]
    assert "shape" in edit["error"]["detail"] and "Traceback" not in edit["error"]["detail"]
    assert "edit-not-ready" in problem(stack.client.get(edit["links"]["model"]), 409)["type"]
    problem(stack.client.get(edit["links"]["pruning_plan"]), 409)
    assert stack.client.get(f"/v1/jobs/{job['id']}").json() == before
    after = stack.client.get(f"/v1/jobs/{job['id']}/neurons", params={"limit": 1000}).json()["items"]
    assert after == job["neurons"]


def test_an_edit_whose_worker_died_is_sent_again_and_one_that_kills_workers_fails(stack, job):
    """A running edit whose lease expired goes back to the queue and runs; after MAX_ATTEMPTS claims it fails."""
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    with session_factory(stack.settings.resolved_database_url)() as session:
        for edit_id, attempts in (("e_died", 1), ("e_kills", lifecycle.MAX_ATTEMPTS)):
            edit = lifecycle.new_edit(id=edit_id, job_id=job["id"], tenant="default", selection={"top": 1})
            edit.state, edit.attempts = JobState.RUNNING, attempts
            edit.lease_owner, edit.lease_expires_at, edit.started_at = "gone:1", long_ago, long_ago
            session.add(edit)
        session.commit()
    app = stack.client.app
    sent = reconcile(stack.settings, app.state.queue, app.state.bus)
    assert "e_died" in sent and "e_kills" not in sent
    assert wait_edit(stack, job["id"], "e_died")["state"] == "succeeded"
    killed = stack.client.get(f"/v1/jobs/{job['id']}/edits/e_kills").json()
    assert killed["state"] == "failed" and "stopped" in killed["error"]["detail"]
    with session_factory(stack.settings.resolved_database_url)() as session:
        assert session.get(Edit, "e_died").attempts == 2


def test_another_tenants_job_and_edits_do_not_exist(tmp_path, tiny_cnn):
    with stacks.embedded(tmp_path, require_api_keys=True) as stack:
        with session_factory(stack.settings.resolved_database_url)() as session:
            _, a = create_key(session, "team-a")
            _, b = create_key(session, "team-b")
        as_a, as_b = {"Authorization": f"Bearer {a}"}, {"Authorization": f"Bearer {b}"}
        job = submit(stack.client, tiny_cnn, SPEC, key=a)
        stack.client.headers.update(as_a)
        assert stack.wait(job["id"], ("succeeded", "failed"))["state"] == "succeeded"
        edit = post_edit(stack, job["id"], {"top": 1}).json()
        assert wait_edit(stack, job["id"], edit["id"])["state"] == "succeeded"
        stack.client.headers.pop("Authorization")
        problem(post_edit(stack, job["id"], {"top": 1}), 401)
        stack.client.headers.update(as_b)
        problem(post_edit(stack, job["id"], {"top": 1}), 404)
        for path in ("", f"/{edit['id']}", f"/{edit['id']}/model", f"/{edit['id']}/pruning-plan"):
            problem(stack.client.get(f"/v1/jobs/{job['id']}/edits{path}"), 404)


@pytest.mark.slow
def test_under_the_mean_policy_the_edited_model_fills_removed_channels_as_the_game_does(stack, tiny_cnn):
    spec = SPEC | {"players": {"ablation": "mean"}}
    job = submit(stack.client, tiny_cnn, spec)
    assert stack.wait(job["id"], ("succeeded", "failed"))["state"] == "succeeded"
    edit = wait_edit(stack, job["id"], post_edit(stack, job["id"], {"top": 3}).json()["id"])
    assert edit["state"] == "succeeded" and edit["ablation"] == "mean", edit["error"]
    figures = edit["metrics"]["job_data"]
    assert figures["after"] != figures["before"]  # the top neurons matter: a wrong fill would show
    assert onnx_figures(stack.client.get(edit["links"]["model"]).content, tiny_cnn) == {
        "after": pytest.approx(figures["after"], abs=1e-12),
        "groups": {g: pytest.approx(v["after"], abs=1e-12) for g, v in figures["groups"].items()},
    }
