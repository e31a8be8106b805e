"""The test harness: tests share code only through ``tests/harness``, and a run's Redis keys and queues are its own."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import redis

from app.core.bus import RedisBus
from app.core.queue import CeleryQueue
from tests.harness.imports import imported_names
from tests.harness.services import REDIS_URL, RUN_ID, Namespace, namespace, sweep_run

ROOT = Path(__file__).resolve().parents[1]


def foreign_test_imports(root: Path, directories: tuple[str, ...] = ("tests", "bench")) -> list[str]:
    """Imports of anything in ``tests`` but the harness: another test module, or conftest (pytest's, not a library)."""
    found = []
    for directory in directories:
        for path in sorted((root / directory).rglob("*.py")):
            for name in sorted(imported_names(path, root, members=True)):
                if name.startswith("tests.") and not (name == "tests.harness" or name.startswith("tests.harness.")):
                    found.append(f"{path.relative_to(root)} imports {name}")
    return found


def test_no_test_or_benchmark_imports_another_test_module_or_conftest():
    assert foreign_test_imports(ROOT) == []


def test_the_import_check_sees_every_way_of_importing_a_test(tmp_path):
    (tmp_path / "tests" / "harness").mkdir(parents=True)
    (tmp_path / "bench").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text(
        "from tests.harness.jobs import QUICK\nfrom tests import harness\n"
        "def f():\n    from tests.test_b import helper\n"
    )
    (tmp_path / "tests" / "test_b.py").write_text("from tests import stacks\nfrom . import conftest\n")
    (tmp_path / "tests" / "harness" / "x.py").write_text("from .jobs import QUICK\n")
    (tmp_path / "bench" / "bench_x.py").write_text("import tests.conftest\n")
    assert foreign_test_imports(tmp_path) == [
        "tests/test_a.py imports tests.test_b",
        "tests/test_a.py imports tests.test_b.helper",
        "tests/test_b.py imports tests.conftest",
        "tests/test_b.py imports tests.stacks",
        "bench/bench_x.py imports tests.conftest",
    ]


def keys_of(ns: Namespace) -> list[bytes]:
    """Every key in the Redis database that names the namespace's prefix or queue."""
    found = redis.Redis.from_url(REDIS_URL).scan_iter(count=1000)
    return [k for k in found if k.startswith(ns.prefix.encode()) or ns.queue.encode() in k]


@pytest.mark.service
def test_two_namespaces_share_the_redis_database_without_seeing_each_other():
    assert namespace().prefix.startswith(f"t{RUN_ID}:") and namespace().queue.startswith(f"jobs-{RUN_ID}-")
    run = f"x{uuid.uuid4().hex[:7]}"  # a run of its own, so that sweeping it leaves this test run's stacks alone
    a, b = namespace(run), namespace(run)
    assert a != b
    other_run = redis.Redis.from_url(REDIS_URL)
    other_run.set(f"t{run}x:job:j:live", "{}", ex=60)  # another run's key (its id starts like ours): never touched
    # Messages a worker took and never acknowledged, as kombu keeps them: (message, exchange, routing key = queue).
    unacked = {f"{run}-{q}": json.dumps([{}, "", q]) for q in (a.queue, b.queue, f"jobs-{run}x-0")}
    other_run.hset("unacked", mapping=unacked)
    try:
        bus_a, bus_b = RedisBus(REDIS_URL, a.prefix), RedisBus(REDIS_URL, b.prefix)
        bus_a.set_live("j", {"who": "a"})
        bus_a.publish("j", "state", {"state": "running"})
        assert bus_b.get_live("j") is None and bus_b.read("j", None, 0.01) == []
        assert bus_a.get_live("j") == {"who": "a"}

        queue_a, queue_b = CeleryQueue(REDIS_URL, a.queue), CeleryQueue(REDIS_URL, b.queue)
        queue_a.enqueue("j_a")
        queue_b.enqueue("j_b")
        assert queue_a.waiting() == {"j_a"} and queue_b.waiting() == {"j_b"}

        assert a.drop() >= 4  # the live key, the stream, the queue's list (and kombu's bindings), the message
        assert bus_a.get_live("j") is None and queue_a.waiting() == set() and keys_of(a) == []
        assert queue_b.waiting() == {"j_b"} and keys_of(b) and other_run.exists(f"t{run}x:job:j:live")
        assert other_run.hmget("unacked", list(unacked)) == [None, *map(str.encode, list(unacked.values())[1:])]
        sweep_run(run=run)  # the end of a run: all of its keys go, and only its own
        assert keys_of(b) == [] and other_run.exists(f"t{run}x:job:j:live")
        assert other_run.hmget("unacked", list(unacked))[:2] == [None, None]
        assert other_run.hexists("unacked", f"{run}-jobs-{run}x-0")
    finally:
        other_run.delete(f"t{run}x:job:j:live")
        other_run.hdel("unacked", *unacked)
        a.drop(), b.drop()
