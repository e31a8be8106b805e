"""Errors as RFC 9457 ``application/problem+json``.

Service functions raise :class:`Problem`; the handlers registered by
:func:`install` turn it, FastAPI's validation errors and anything unexpected
into a problem document, so a client never gets a bare 500 or an HTML page.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .db import UNAVAILABLE

MEDIA_TYPE = "application/problem+json"
DATABASE_RETRY_AFTER_S = 5
TYPE_BASE = "https://neuronshap.dev/problems/"

log = logging.getLogger(__name__)


class Problem(Exception):
    """An error the client can act on: ``detail`` says what is wrong and how to fix it."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.slug, self.title, self.detail = status, slug, title, detail
        self.field, self.headers = field, headers

    def body(self, instance: str | None = None) -> dict:
        doc = {"type": TYPE_BASE + self.slug, "title": self.title, "status": self.status, "detail": self.detail}
        if self.field is not None:
            doc["field"] = self.field
        if instance:
            doc["instance"] = instance
        return doc


def not_found(what: str, ident: str) -> Problem:
    return Problem(
        404,
        "not-found",
        f"{what.capitalize()} not found",
        f"There is no {what} {ident!r} (or it belongs to another tenant); list jobs with GET /v1/jobs.",
    )


def respond(problem: Problem, instance: str | None = None) -> JSONResponse:
    return JSONResponse(
        problem.body(instance), status_code=problem.status, media_type=MEDIA_TYPE, headers=problem.headers
    )


def field_path(loc: tuple) -> str:
    """``("body", "spec", "metric", "name")`` → ``spec.metric.name``: where the client looks for it."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "request"


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return respond(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = field_path(tuple(first.get("loc", ())))
        detail = "; ".join(f"{field_path(tuple(e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        return respond(Problem(422, "invalid-request", "Invalid request", detail, field=where), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "HTTP error")
        detail = exc.detail if isinstance(exc.detail, str) else title
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"No route {request.method} {request.url.path}; the API lives under /v1 (see /docs)."
        return respond(
            Problem(exc.status_code, f"http-{exc.status_code}", title, detail, headers=getattr(exc, "headers", None)),
            request.url.path,
        )

    async def _database_away(request: Request, exc: Exception) -> JSONResponse:
        # A restarting database is an outage, not a bug: say so and when to come back, so that pollers wait
        # instead of giving up (and a load balancer's retry does not look like a 500 loop).
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        return respond(
            Problem(
                503,
                "unavailable",
                "Service unavailable",
                "The job database is unreachable (restarting or overloaded); nothing was lost. "
                f"Retry in {DATABASE_RETRY_AFTER_S} s.",
                headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
            ),
            request.url.path,
        )

    for error in UNAVAILABLE:
        app.add_exception_handler(error, _database_away)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return respond(
            Problem(
                500, "internal", "Internal error", "The service failed on this request; it was logged. Retry later."
            ),
            request.url.path,
        )
