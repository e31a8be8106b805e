"""The caller's tenant, as a request dependency: taken from its API key, or the one tenant of a keyless service."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.core.db import SessionDep

from .service import authenticate

DEFAULT_TENANT = "default"

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer nsk_…`")


def _tenant(
    request: Request, session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The caller's tenant, from its API key; every job is scoped by it.

    Without ``NEURONSHAP_REQUIRE_API_KEYS`` (the embedded default) there is
    one tenant and no key is asked for.
    """
    if not request.app.state.settings.require_api_keys:
        return DEFAULT_TENANT
    tenant = authenticate(session, credentials.credentials if credentials else None)
    session.commit()  # end the read: the connection goes back to the pool while the request's uploads are stored
    return tenant


TenantDep = Annotated[str, Depends(_tenant)]
