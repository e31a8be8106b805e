"""Request dependencies: what a route needs, taken from the application's state.

``create_app`` builds the adapters once (blob store, queue, bus) from one
:class:`Settings`; routes receive them by type, so tests can run several
differently configured apps in one process.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .blobs import BlobStore
from .bus import Bus
from .config import Settings
from .queue import Queue


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _store(request: Request) -> BlobStore:
    return request.app.state.store


def _bus(request: Request) -> Bus:
    return request.app.state.bus


def _queue(request: Request) -> Queue:
    return request.app.state.queue


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[BlobStore, Depends(_store)]
BusDep = Annotated[Bus, Depends(_bus)]
QueueDep = Annotated[Queue, Depends(_queue)]
