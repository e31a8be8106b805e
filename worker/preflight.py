"""The submit-time check of a job's uploads: does the model load, take the data and fit the spec?

The API answers 202 only after this check (docs/API.md): a model that cannot
load, data it cannot take, or layers and a metric that do not fit it are
refused at ``POST /v1/jobs`` instead of failing the job a second later.
:func:`check_upload` is the API's :class:`app.jobs.uploads.CheckUpload`,
wired by ``neuronshap.server``. It does not load torch in the API process:
the check runs in a child of a check server (``python -m worker.preflight
--serve``, started on the first check, torch imported once, one fork per
check), which also keeps an upload a stranger crafted away from the API
process; ``python -m worker.preflight MODEL DATA SPEC`` runs one check by
hand. The child builds the game exactly as the worker will (:func:`worker.translate.build_game`:
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
import math
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path

from app.jobs.spec import JobSpec
from app.jobs.uploads import RejectedPart, Rejection, StoredUpload
from worker.upload_names import link

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
            parts = ((model, "model"), (data, "data"))
            names = [link(Path(tmp), u.path, u.filename, u.format, part).name for u, part in parts]
            limit = BASE_MEMORY_BYTES + MEMORY_PER_UPLOADED_BYTE * sum(u.path.stat().st_size for u in (model, data))
            request = {"cwd": tmp, "model": names[0], "data": names[1], "spec": spec.model_dump_json(by_alias=True)}
            answer, trouble = _SERVER.check(request, limit, max(0.0, deadline - time.monotonic()))
    finally:
        _SLOTS.release()
    if answer is None:
        log.warning("upload check of %s %s; accepted (the worker judges it)", names[0], trouble)
        return None
    if answer["ok"]:
        return None
    return Rejection(answer["part"], answer["detail"])


class _Server:
    """The API's side of ``python -m worker.preflight --serve``: one child that imports torch and the loaders
    once, and forks one process per check.

    Starting Python and importing torch was most of a check's cost (about 1.7 s of CPU of 2.8 s for the digits
    CNN); a fork of a process that has them costs milliseconds. The forked process is as isolated as a fresh
    one: its own address-space limit and alarm, and its answer in a file of its own directory. The server is
    started on the first check and again whenever it has died; requests and answers are JSON lines matched by id.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        # Each pending check: its event, the box its answer goes in, and the server it was sent to.
        self._waiting: dict[str, tuple[threading.Event, list[dict], subprocess.Popen[str]]] = {}

    def check(self, request: dict, memory_bytes: int, timeout_s: float) -> tuple[dict | None, str]:
        """The check's answer and, when there is none, what happened instead (for the log)."""
        ident = uuid.uuid4().hex
        done, box = threading.Event(), list[dict]()
        try:
            with self._lock:
                process = self._running()
                self._waiting[ident] = (done, box, process)
                assert process.stdin is not None
                line = {**request, "id": ident, "memory_bytes": memory_bytes, "timeout_s": timeout_s}
                process.stdin.write(json.dumps(line) + "\n")
                process.stdin.flush()
        except OSError as exc:  # the server died between two checks: the next check starts another
            self._waiting.pop(ident, None)
            return None, f"could not reach the check server ({exc})"
        if not done.wait(timeout_s):
            self._waiting.pop(ident, None)
            return None, f"timed out after {timeout_s:g} s"
        if not box or box[0].get("ok") is None:
            return None, f"ended without an answer ({box[0].get('exit') if box else 'the check server stopped'})"
        return box[0], ""

    def _running(self) -> subprocess.Popen[str]:
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "worker.preflight", "--serve"],
                cwd=ROOT,
                env=_child_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            threading.Thread(target=self._answers, args=(self._process,), name="preflight", daemon=True).start()
        return self._process

    def _answers(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            try:
                answer = json.loads(line)
            except json.JSONDecodeError:  # a library printed to stdout: not an answer
                continue
            waiter = self._waiting.pop(str(answer.get("id")), None) if isinstance(answer, dict) else None
            if waiter is not None:
                waiter[1].append(answer)
                waiter[0].set()
        # This server is gone: none of its checks waits out the timeout for it. Only its own: a check sent to the
        # server started after it died must wait for that one's answer.
        for done, _, owner in list(self._waiting.values()):
            if owner is process:
                done.set()


_SERVER = _Server()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the check runs on the CPU: it must not take a GPU a worker uses
    env["OMP_NUM_THREADS"] = "2"  # a few examples' forward passes; the API host's cores serve requests
    return env


# --- the child -------------------------------------------------------------------------------------------------


def judge(model: str, data: str, spec: JobSpec) -> dict:
    """Build the job's game as the worker will; the answer the child prints."""
    from app.core.config import get_settings
    from worker.shapley.errors import DataError, ModelError, UserInputError
    from worker.translate import build_game

    parts: dict[type, RejectedPart] = {ModelError: "model", DataError: "data"}
    memory_mb = get_settings().activation_memory_mb  # the deployment's setting, as the worker reads it
    try:
        game, _ = build_game(
            spec, model, data, device="cpu", memory_bytes=None if memory_mb is None else memory_mb << 20
        )
    except UserInputError as exc:  # anything else is not the upload's fault: it crashes, and the worker judges
        part = parts.get(type(exc), "spec")
        # Say which file the message is about when it does not: a pipeline submits many.
        about = {"model": model, "data": data}.get(part, f"{model} with {data}")
        detail = str(exc) if about in str(exc) else f"{about}: {exc}"
        return {"ok": False, "part": part, "detail": detail}
    return {"ok": True, "players": game.n_players}


def serve() -> int:
    """``--serve``: read check requests (JSON lines) on stdin; fork one process per check; print each answer.

    The parent imports torch and the loaders before the first request and runs no torch op itself, so that a
    fork starts no thread pool twice. It stays single-threaded: stdin and finished children are watched from
    one loop. It ends when stdin closes (the API process is gone).
    """
    import torch  # noqa: F401  imported once here, so that every forked check has it

    import worker.translate  # noqa: F401  and the loaders

    children: dict[int, dict] = {}
    pending = b""
    stdin = sys.stdin.fileno()
    open_ = True
    while open_ or children:
        ready, _, _ = select.select([stdin] if open_ else [], [], [], 0.05 if children else None)
        if ready:
            chunk = os.read(stdin, 1 << 16)
            open_ = bool(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:  # the check: never returns into the loop
                    os._exit(_forked_check(request))
                children[pid] = request
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            request = children.pop(pid)
            answer_file = Path(request["cwd"]) / _ANSWER
            answer = json.loads(answer_file.read_text()) if answer_file.exists() else {"ok": None}
            answer_file.unlink(missing_ok=True)
            print(json.dumps({**answer, "id": request["id"], "exit": os.waitstatus_to_exitcode(status)}), flush=True)
    return 0


_ANSWER = ".answer.json"


def _forked_check(request: dict) -> int:
    """One check in a forked process: its limits first, then the judgement, written where the server reads it."""
    try:
        resource.setrlimit(resource.RLIMIT_AS, (request["memory_bytes"], request["memory_bytes"]))
        signal.alarm(max(1, math.ceil(request["timeout_s"])))  # killed past the time the API waits
        os.chdir(request["cwd"])  # the uploads under their client names: messages name those
        answer = judge(request["model"], request["data"], JobSpec.model_validate_json(request["spec"]))
        Path(_ANSWER).write_text(json.dumps(answer))
        return 0
    except BaseException:  # a crash is no answer: the API accepts and the worker judges
        traceback.print_exc()
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.preflight",
        description="Check that a model loads, takes the data and fits a job spec; prints one JSON object.",
    )
    parser.add_argument("model", nargs="?", help="the model file (.onnx, .pt2)")
    parser.add_argument("data", nargs="?", help="the evaluation set (.npz, .safetensors)")
    parser.add_argument("spec", nargs="?", help="the job spec as JSON text")
    parser.add_argument("--memory-bytes", type=int, default=None, help="limit this process's address space")
    parser.add_argument("--serve", action="store_true", help="serve checks on stdin (the API's check server)")
    args = parser.parse_args(argv)
    if args.serve:
        return serve()
    if not (args.model and args.data and args.spec):
        parser.error("MODEL, DATA and SPEC are needed (or --serve)")
    if args.memory_bytes:  # before anything is read: a file crafted to exhaust memory hits the limit, not the host
        resource.setrlimit(resource.RLIMIT_AS, (args.memory_bytes, args.memory_bytes))
    print(json.dumps(judge(args.model, args.data, JobSpec.model_validate_json(args.spec))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
