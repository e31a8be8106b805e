"""``GET /v1/jobs/{id}/report``: the job's report page, one HTML file shipped in this package.

The page holds no job data: its script reads the job's JSON endpoints and
follows its event stream, with the caller's API key, so it shows exactly what
the key may see. A browser cannot put an ``Authorization`` header on a
navigation, so without keys required the route checks the job exists (404 like
every job endpoint), and with keys required it checks the job only when the
request carries a key: a plain navigation gets the empty page, which takes the
key from the URL's fragment (``#key=nsk_…``, never sent to the server, never
in its logs or a ``Referer``) or asks for it.
"""

from __future__ import annotations

import html
import secrets
from functools import cache
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.core.db import SessionDep
from app.core.problems import MEDIA_TYPE
from app.jobs import service
from app.keys.deps import DEFAULT_TENANT
from app.keys.service import authenticate

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer nsk_…`")
PROBLEM: dict[str, Any] = {"content": {MEDIA_TYPE: {}}, "description": "a problem document (RFC 9457)"}


def _viewer(
    request: Request, session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str | None:
    """The caller's tenant where the request says it (a key, or a keyless service); None for a browser's plain
    navigation to a service that requires keys."""
    if not request.app.state.settings.require_api_keys:
        return DEFAULT_TENANT
    if credentials is None:
        return None
    tenant = authenticate(session, credentials.credentials)
    session.commit()
    return tenant


@cache
def _template() -> str:
    return resources.files(__package__).joinpath("report.html").read_text(encoding="utf-8")


@router.get(
    "/{job_id}/report",
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {}}}, 401: PROBLEM, 404: PROBLEM, 503: PROBLEM},
    # The key is optional here (the module's docstring says why): added to the Bearer requirement, `{}` makes
    # the operation's security "Bearer, or none".
    openapi_extra={"security": [{}]},
)
def job_report(job_id: str, session: SessionDep, tenant: Annotated[str | None, Depends(_viewer)]) -> HTMLResponse:
    """The job as a page for people: state and progress (live while it runs), the top and bottom neurons with
    their intervals, values per layer, the ablation curves and the edits. Self-contained: no asset from another
    host."""
    if tenant is not None:
        service.get_job(session, tenant, job_id)
    nonce = secrets.token_urlsafe(16)
    page = _template().replace("{{job_id}}", html.escape(job_id)).replace("{{nonce}}", nonce)
    return HTMLResponse(
        page,
        headers={
            # Only this page's own script and style run, and it talks only to this service.
            "Content-Security-Policy": (
                f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
                "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            ),
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        },
    )
