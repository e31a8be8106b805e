"""Readiness checks and the Prometheus metrics of the API process."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.core.bus import Bus
from app.core.queue import Queue
from app.jobs.models import Job
from app.jobs.states import JobState

REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "neuronshap_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=REGISTRY
)
LATENCY = Histogram(
    "neuronshap_http_request_seconds",
    "Time to answer an HTTP request",
    ["method", "route"],
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
JOBS = Gauge("neuronshap_jobs", "Jobs by state, all tenants", ["state"], registry=REGISTRY)


def readiness(session: Session, queue: Queue, bus: Bus) -> dict[str, str]:
    checks: dict[str, str] = {}
    for name, check in (
        ("database", lambda: session.execute(text("SELECT 1"))),
        ("broker", queue.ping),
        ("redis", bus.ping),
    ):
        try:
            check()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unreachable: {type(exc).__name__}: {exc}"[:300]
    return checks


def render_metrics(session: Session) -> tuple[bytes, str]:
    counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    for state in JobState:
        JOBS.labels(state.value).set(counts.get(state, 0))
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """HTTP middleware: count and time every request by its route template (not its raw path, to bound labels)."""
    start = time.perf_counter()
    response = await call_next(request)
    route = request.scope.get("route")
    template = getattr(route, "path", "unmatched")
    LATENCY.labels(request.method, template).observe(time.perf_counter() - start)
    REQUESTS.labels(request.method, template, str(response.status_code)).inc()
    return response
