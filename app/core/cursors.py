"""Opaque page cursors: a position, bound to the list it came from and signed.

A cursor the service did not issue, or one issued for another list (another
tenant, filter or order), is refused with a 400 rather than silently
returning a wrong page.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from .clock import utc
from .problems import Problem


def encode(position: dict, scope: str, secret: str) -> str:
    body = base64.urlsafe_b64encode(json.dumps(position, separators=(",", ":")).encode()).rstrip(b"=").decode()
    return f"{body}.{_sign(body, scope, secret)}"


def decode(cursor: str, scope: str, secret: str) -> dict:
    body, _, signature = cursor.partition(".")
    if not signature or not hmac.compare_digest(signature, _sign(body, scope, secret)):
        raise Problem(
            400,
            "invalid-cursor",
            "Invalid cursor",
            "This cursor was not issued for this list; pass the `next_cursor` of the previous page "
            "unchanged, with the same filters, or omit it to start from the first page.",
            field="cursor",
        )
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def _sign(body: str, scope: str, secret: str) -> str:
    mac = hmac.new(secret.encode(), f"{scope}\n{body}".encode(), hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def newest_first(
    session: Session, query: Select[Any], table: Any, scope: str, secret: str, limit: int, cursor: str | None
) -> tuple[list[Any], str | None]:
    """One page of ``query`` over ``table`` (a model with ``created_at`` and ``id``), newest first, and the
    cursor of the next page (None on the last): keyset paging, so a page stays right while rows are added."""
    if cursor is not None:
        pos = decode(cursor, scope, secret)
        created, last_id = datetime.fromisoformat(pos["c"]), pos["i"]
        query = query.where(or_(table.created_at < created, and_(table.created_at == created, table.id < last_id)))
    rows = list(session.scalars(query.order_by(table.created_at.desc(), table.id.desc()).limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    last = rows[-1]
    return rows, encode({"c": utc(last.created_at).isoformat(), "i": last.id}, scope, secret)
