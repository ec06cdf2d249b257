"""Stored Responses API answers, per tenant, with an expiry.

A row is found by its id *and* its tenant: another tenant's id reads as absent (the HTTP
side answers 404 either way, so ids leak nothing). Expired rows read as absent too, and
are deleted opportunistically: at most once per ``PURGE_EVERY_S`` a write also removes
everything expired, a range scan on ``expires_at``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from .errors import LedgerUnavailable
from .ledger import Ledger
from .models import StoredResponse, utcnow

PURGE_EVERY_S = 60.0


@dataclass(frozen=True)
class Stored:
    """One stored response: the object as the API shows it and the conversation (the chat
    turns up to and including this response's output) a continuation renders."""

    id: str
    tenant_id: int
    response: dict[str, Any]
    conversation: list[dict[str, Any]]
    expires_at: datetime


class ResponseStore:
    def __init__(self, ledger: Ledger, ttl_s: float) -> None:
        self.ledger = ledger
        self.ttl_s = ttl_s
        self._last_purge = float("-inf")

    @contextlib.asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        """A transaction on the ledger's database; any database failure is
        ``LedgerUnavailable`` (the caller decides what a missing store means)."""
        if self.ledger.sqlite_file is not None:
            self.ledger.sqlite_file.check()
        try:
            async with self.ledger.engine.begin() as conn:
                yield conn
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            raise LedgerUnavailable(f"response store unavailable: {exc}") from exc

    async def put(self, tenant_id: int, response_id: str, response: dict[str, Any],
                  conversation: list[dict[str, Any]]) -> datetime:
        now = utcnow()
        expires = now + timedelta(seconds=self.ttl_s)
        async with self._begin() as conn:
            await conn.execute(insert(StoredResponse).values(
                id=response_id, tenant_id=tenant_id, created_at=now, expires_at=expires,
                response=json.dumps(response, separators=(",", ":")),
                conversation=json.dumps(conversation, separators=(",", ":"))))
            if time.monotonic() - self._last_purge >= PURGE_EVERY_S:
                self._last_purge = time.monotonic()
                await conn.execute(delete(StoredResponse)
                                   .where(StoredResponse.expires_at <= now))
        return expires

    async def get(self, tenant_id: int, response_id: str) -> Stored | None:
        """The tenant's unexpired response, or None."""
        async with self._begin() as conn:
            row = (await conn.execute(select(StoredResponse).where(
                StoredResponse.id == response_id, StoredResponse.tenant_id == tenant_id,
                StoredResponse.expires_at > utcnow()))).mappings().first()
        if row is None:
            return None
        return Stored(row["id"], row["tenant_id"], json.loads(row["response"]),
                      json.loads(row["conversation"]), row["expires_at"])

    async def delete(self, tenant_id: int, response_id: str) -> bool:
        """False when the tenant has no such (unexpired) response."""
        async with self._begin() as conn:
            result = await conn.execute(delete(StoredResponse).where(
                StoredResponse.id == response_id, StoredResponse.tenant_id == tenant_id,
                StoredResponse.expires_at > utcnow()))
        return bool(getattr(result, "rowcount", 0))

    async def expire_now(self, tenant_id: int, response_id: str) -> None:
        """Test and operator hook: the response expires at once (as if its TTL passed)."""
        async with self._begin() as conn:
            await conn.execute(update(StoredResponse).where(
                StoredResponse.id == response_id, StoredResponse.tenant_id == tenant_id)
                .values(expires_at=utcnow() - timedelta(seconds=1)))
