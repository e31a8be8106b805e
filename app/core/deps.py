"""Request dependencies: what a route needs, taken from the application's state.

``create_app`` builds the adapters once (blob store, queue, bus) from one
:class:`Settings`; routes receive them by type, so tests can run several
differently configured apps in one process.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.keys.service import authenticate

from .blobs import BlobStore
from .bus import Bus
from .config import Settings
from .db import SessionDep
from .queue import Queue

DEFAULT_TENANT = "default"


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _store(request: Request) -> BlobStore:
    return request.app.state.store


def _bus(request: Request) -> Bus:
    return request.app.state.bus


def _queue(request: Request) -> Queue:
    return request.app.state.queue


_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer nsk_…`")


def _tenant(request: Request, session: SessionDep,
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The caller's tenant, from its API key; every job is scoped by it.

    Without ``NEURONSHAP_REQUIRE_API_KEYS`` (the embedded default) there is
    one tenant and no key is asked for.
    """
    if not request.app.state.settings.require_api_keys:
        return DEFAULT_TENANT
    tenant = authenticate(session, credentials.credentials if credentials else None)
    session.commit()  # end the read: the connection goes back to the pool while the request's uploads are stored
    return tenant


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[BlobStore, Depends(_store)]
BusDep = Annotated[Bus, Depends(_bus)]
QueueDep = Annotated[Queue, Depends(_queue)]
TenantDep = Annotated[str, Depends(_tenant)]
