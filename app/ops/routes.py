"""Liveness, readiness and Prometheus metrics, for orchestrators and dashboards."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from app.core.db import SessionDep
from app.core.deps import BusDep, QueueDep

from . import service

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency is unreachable; `checks` says which"}})
def readyz(session: SessionDep, queue: QueueDep, bus: BusDep) -> JSONResponse:
    """200 when the database, the broker and the live-state store all answer; 503 and which one failed otherwise."""
    checks = service.readiness(session, queue, bus)
    ok = all(c == "ok" for c in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response)
def metrics(session: SessionDep) -> Response:
    """Prometheus text format: request counts and latencies, jobs by state."""
    body, content_type = service.render_metrics(session)
    return Response(body, media_type=content_type)
