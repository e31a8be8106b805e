"""The submit-time check of a job's uploads: does the model load, take the data and fit the spec?

The API answers 202 only after this check (docs/API.md): a model that cannot
load, data it cannot take, or layers and a metric that do not fit it are
refused at ``POST /v1/jobs`` instead of failing the job a second later.
:func:`check_upload` is the API's :class:`app.jobs.uploads.CheckUpload`,
wired by ``neuronshap.server``. It does not load torch in the API process:
the check runs in a child, ``python -m worker.preflight MODEL DATA SPEC``,
which also keeps an upload a stranger crafted away from the API process. The
child builds the game exactly as the worker will (:func:`worker.translate.build_game`:
the same loaders, the same layer, metric and ``top_k`` checks, the same
messages), on the CPU, without estimating anything, under a memory limit,
and prints one JSON object.

The child sees the uploads under the names their client gave them (links in
a directory of its own, which is its working directory), so its messages
name ``cnn.onnx``, never a blob or temporary path.

A check that cannot conclude (past ``preflight_timeout_s``, over its memory
limit, or a crash) accepts the job with a warning in the API's log: the
worker loads the model again and fails the job with the same message if it
is bad. The worker keeps all of its own checks; this one only answers
earlier.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from app.jobs.spec import JobSpec
from app.jobs.uploads import RejectedPart, Rejection, StoredUpload

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]  # where `worker` and `app` are importable from, for the child
# The child's address space: torch alone maps about 1 GiB; the uploads are held a few times over (file, arrays,
# tensors, the masked model's copy).
BASE_MEMORY_BYTES = 3 << 30
MEMORY_PER_UPLOADED_BYTE = 4
# At most this many checks at once (each a process with torch): a burst of submissions waits for a slot, within
# its timeout, rather than fork a torch per request.
_SLOTS = threading.BoundedSemaphore(max(1, (os.cpu_count() or 1) // 2))


def check_upload(spec: JobSpec, model: StoredUpload, data: StoredUpload, timeout_s: float) -> Rejection | None:
    """Run the check in a child; a :class:`Rejection` when it refuses, None when it accepts or cannot tell."""
    deadline = time.monotonic() + timeout_s
    if not _SLOTS.acquire(timeout=timeout_s):
        log.warning(
            "upload check: no free slot within %g s; %s accepted unchecked (the worker judges it)",
            timeout_s,
            model.filename,
        )
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="neuronshap-preflight-") as tmp:
            names = [_link(Path(tmp), upload, part) for upload, part in ((model, "model"), (data, "data"))]
            limit = BASE_MEMORY_BYTES + MEMORY_PER_UPLOADED_BYTE * sum(u.path.stat().st_size for u in (model, data))
            command = [sys.executable, "-m", "worker.preflight", f"--memory-bytes={limit}", "--", *names]
            command.append(spec.model_dump_json(by_alias=True))
            try:
                done = subprocess.run(
                    command,
                    cwd=tmp,
                    env=_child_env(),
                    capture_output=True,
                    text=True,
                    timeout=max(0.0, deadline - time.monotonic()),
                )
            except subprocess.TimeoutExpired:
                log.warning(
                    "upload check of %s timed out after %g s; accepted (the worker judges it)", names[0], timeout_s
                )
                return None
    finally:
        _SLOTS.release()
    answer = _answer(done.stdout)
    if done.returncode != 0 or answer is None:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        log.warning(
            "upload check of %s ended without an answer (exit %s: %s); accepted (the worker judges it)",
            names[0],
            done.returncode,
            last,
        )
        return None
    if answer["ok"]:
        return None
    return Rejection(answer["part"], answer["detail"])


def _link(directory: Path, upload: StoredUpload, part: str) -> str:
    """Put the blob in ``directory`` under the client's file name (its last component, printable, with the
    format's extension, which the loaders read); returns that name."""
    name = Path((upload.filename or "").replace("\\", "/")).name
    name = "".join(c for c in name if c.isprintable()).strip()[:120]
    if not name or name.startswith("."):
        name = part
    if not name.lower().endswith(f".{upload.format}"):
        name += f".{upload.format}"
    (directory / name).symlink_to(upload.path.resolve())
    return name


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the check runs on the CPU: it must not take a GPU a worker uses
    env["OMP_NUM_THREADS"] = "2"  # a few examples' forward passes; the API host's cores serve requests
    return env


def _answer(stdout: str) -> dict | None:
    """The child's JSON answer: its last line of output (a library may print before it)."""
    lines = stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None
    return answer if isinstance(answer, dict) and "ok" in answer else None


# --- the child -------------------------------------------------------------------------------------------------


def judge(model: str, data: str, spec: JobSpec) -> dict:
    """Build the job's game as the worker will; the answer the child prints."""
    from worker.shapley.errors import DataError, ModelError, UserInputError
    from worker.translate import build_game

    parts: dict[type, RejectedPart] = {ModelError: "model", DataError: "data"}
    try:
        game, _ = build_game(spec, model, data, device="cpu")
    except UserInputError as exc:  # anything else is not the upload's fault: it crashes, and the worker judges
        part = parts.get(type(exc), "spec")
        # Say which file the message is about when it does not: a pipeline submits many.
        about = {"model": model, "data": data}.get(part, f"{model} with {data}")
        detail = str(exc) if about in str(exc) else f"{about}: {exc}"
        return {"ok": False, "part": part, "detail": detail}
    return {"ok": True, "players": game.n_players}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.preflight",
        description="Check that a model loads, takes the data and fits a job spec; prints one JSON object.",
    )
    parser.add_argument("model", help="the model file (.onnx, .pt2)")
    parser.add_argument("data", help="the evaluation set (.npz, .safetensors)")
    parser.add_argument("spec", help="the job spec as JSON text")
    parser.add_argument("--memory-bytes", type=int, default=None, help="limit this process's address space")
    args = parser.parse_args(argv)
    if args.memory_bytes:  # before anything is read: a file crafted to exhaust memory hits the limit, not the host
        resource.setrlimit(resource.RLIMIT_AS, (args.memory_bytes, args.memory_bytes))
    print(json.dumps(judge(args.model, args.data, JobSpec.model_validate_json(args.spec))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
