"""Inputs that must not get in: files that would run code, bodies over the limit, zip bombs."""

from __future__ import annotations

import io
import pickle
import socket
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.harness import stacks
from tests.harness.jobs import post_job, problem
from tests.harness.stacks import serve


class WritesAFile:
    """A pickle payload: unpickling it creates ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_no_upload_runs_code(tmp_path, tiny_cnn):
    target = tmp_path / "pwned"
    payload = pickle.dumps(WritesAFile(target))
    pt2 = io.BytesIO()
    with zipfile.ZipFile(pt2, "w") as zf:  # the layout of a torch.export / TorchScript archive, with the payload
        zf.writestr("model/data.pkl", payload)
        zf.writestr("model/version", "3")
    objects = io.BytesIO()
    np.savez(objects, inputs=np.array([WritesAFile(target)] * 4, dtype=object), labels=np.zeros(4, np.int64))
    npz = (tiny_cnn.npz.name, tiny_cnn.npz.read_bytes())
    onnx = (tiny_cnn.onnx.name, tiny_cnn.onnx.read_bytes())
    with stacks.embedded(tmp_path / "svc") as stack:

        def post(model, data=npz):
            return post_job(stack.client, model=model, data=data)

        for name in ("model.pt", "model.pth", "model.pkl", "model.bin", "model.ckpt"):
            assert "pickle" in problem(post((name, payload)), 415, "model")["detail"]
        problem(post(("model.pt2", pt2.getvalue())), 415, "model")  # .pt2 needs the operator's explicit consent
        problem(post(("model.onnx", payload)), 422, "model")  # not ONNX, whatever its name
        problem(post(("model.onnx", pt2.getvalue())), 422, "model")
        problem(post(onnx, ("eval.npz", objects.getvalue())), 422, "data")  # object arrays would unpickle
        assert not target.exists()
        # The worker refuses .pt2 too, should a job ever reach it (defence in depth): see worker/runner._build.


def test_an_npz_that_unpacks_past_the_limit_is_refused(tmp_path, tiny_cnn):
    bomb = io.BytesIO()
    np.savez_compressed(bomb, inputs=np.zeros((3000, 1, 64, 64), np.float32), labels=np.zeros(3000, np.int64))
    assert len(bomb.getvalue()) < 1 << 20  # ~50 MB of zeros in well under 1 MB
    with stacks.embedded(tmp_path, max_data_bytes=8 << 20) as stack:
        r = post_job(stack.client, tiny_cnn, data=("eval.npz", bomb.getvalue()))
        assert "unpacks to" in problem(r, 413, "data")["detail"]
        entries = io.BytesIO()
        with zipfile.ZipFile(entries, "w") as zf:
            for i in range(40):
                zf.writestr(f"junk{i}.npy", b"")
        r = post_job(stack.client, tiny_cnn, data=("eval.npz", entries.getvalue()))
        problem(r, 422, "data")


@pytest.mark.service  # a served API: the body is refused by the server process before it is read
def test_an_oversized_body_is_refused_before_it_is_read(tmp_path):
    env = {
        "NEURONSHAP_MAX_MODEL_BYTES": "1000",
        "NEURONSHAP_MAX_DATA_BYTES": "1000",
        "NEURONSHAP_MAX_SPEC_BYTES": "1000",
    }
    with serve(tmp_path, **env) as url:
        host, port = url.removeprefix("http://").split(":")
        # Declares 10 GB and sends none of it: the answer comes at once.
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 10000000000\r\n\r\n"
            )
            head = sock.recv(4096).decode()
        assert head.startswith("HTTP/1.1 413") and "application/problem+json" in head

        # Streams without a length: reading stops soon after the cap (~1 MiB here), not at the end of 200 MiB.
        sent = 0

        def body():
            nonlocal sent
            yield b'--b\r\nContent-Disposition: form-data; name="model"; filename="m.onnx"\r\n\r\n'
            for _ in range(200):
                sent += 1 << 20
                yield b"\x08" * (1 << 20)

        try:
            r = httpx.post(
                f"{url}/v1/jobs",
                content=body(),
                timeout=30,
                headers={"Content-Type": "multipart/form-data; boundary=b"},
            )
            assert r.status_code == 413 and r.json()["status"] == 413
        except httpx.TransportError:  # the server may close the connection while we still send: also a refusal
            pass
        assert sent < 50 << 20
        assert not any(p.is_file() for p in (tmp_path / "blobs").rglob("*"))
