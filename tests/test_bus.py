"""The two buses behave alike: the in-memory one of the embedded default and Redis."""

from __future__ import annotations

import threading
import time

import pytest

from app.core.bus import MemoryBus, RedisBus
from tests.harness.services import REDIS_URL, namespace


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.service)])
def bus(request):
    if request.param == "memory":
        yield MemoryBus()
        return
    ns = namespace()  # job ids "j", "j1" are the same in every test: the namespace keeps this test's apart
    try:
        yield RedisBus(REDIS_URL, ns.prefix)
    finally:
        ns.drop()


def test_events_are_read_in_order_and_after_a_given_id(bus):
    ids = [bus.publish("j1", "progress", {"i": i}) for i in range(5)]
    bus.publish("j2", "progress", {"other": True})
    events = bus.read("j1", None, 0.01)
    assert [e[0] for e in events] == ids and [e[2]["i"] for e in events] == list(range(5))
    assert all(kind == "progress" for _, kind, _ in events)
    assert [e[2]["i"] for e in bus.read("j1", ids[2], 0.01)] == [3, 4]
    assert bus.read("j1", ids[-1], 0.01) == []


def test_a_blocked_read_wakes_on_publish(bus):
    first = bus.publish("j", "state", {"state": "queued"})
    threading.Timer(0.2, lambda: bus.publish("j", "done", {"state": "succeeded"})).start()
    t = time.monotonic()
    events = bus.read("j", first, 5.0)
    assert [(k, d) for _, k, d in events] == [("done", {"state": "succeeded"})]
    assert time.monotonic() - t < 3.0


def test_live_snapshot_and_what_ending_and_clearing_keep(bus):
    assert bus.get_live("j") is None
    bus.set_live("j", {"progress": {"iterations": 3}, "neurons": [{"rank": 1}]})
    assert bus.get_live("j")["progress"]["iterations"] == 3
    bus.publish("j", "done", {"state": "succeeded"})
    bus.ended("j")
    assert bus.get_live("j") is None and len(bus.read("j", None, 0.01)) == 1  # late readers still get the end
    bus.clear("j")
    assert bus.read("j", None, 0.01) == []
    bus.ping()
