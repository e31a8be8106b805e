"""Creating, revoking and checking API keys.

A key reads ``nsk_<id>_<secret>``: the id finds the row, and the secret is
compared, as a SHA-256 hash, in constant time. A leaked database holds no
usable key; a wrong key costs the same time whatever it shares with a real one.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.core.db import rowcount
from app.core.problems import Problem

from .models import ApiKey

KEY = re.compile(r"^nsk_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")
TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, tenant: str, name: str | None = None) -> tuple[str, str]:
    """A new key for ``tenant``: returns (key id, the key). The key is shown once and never stored."""
    if not TENANT.match(tenant):
        raise ValueError(f"tenant {tenant!r}: use 1-64 letters, digits, '.', '_' or '-'")
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    session.add(ApiKey(id=key_id, tenant=tenant, secret_hash=_hash(secret), name=name, created_at=datetime.now(UTC)))
    session.commit()
    return key_id, f"nsk_{key_id}_{secret}"


def revoke_key(session: Session, key_id: str) -> bool:
    """Revoke a key by its id (the part after ``nsk_``); False if there is no such active key."""
    done = rowcount(
        session,
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=datetime.now(UTC)),
    )
    session.commit()
    return bool(done)


def authenticate(session: Session, token: str | None) -> str:
    """The tenant of a bearer key; a 401 problem for a missing, unknown or revoked one."""
    match = KEY.match(token.strip()) if token else None
    key = session.get(ApiKey, match.group(1)) if match else None
    # Compare even when the id is unknown, so that timing does not tell ids apart.
    expected = key.secret_hash if key is not None else _hash("no such key")
    given = _hash(match.group(2)) if match else ""
    if not hmac.compare_digest(expected, given) or key is None or key.revoked_at is not None:
        raise Problem(
            401,
            "unauthorized",
            "Unauthorized",
            "Send a valid API key as `Authorization: Bearer nsk_…`; the operator creates one with "
            "`neuronshap keys create --tenant NAME`.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return key.tenant
