"""Billing receipts: ``GET /v1/receipts/{id}`` (the tenant's own, signed) and the public key
that verifies them, ``GET /.well-known/kvgate-receipt-key`` (no key needed).

Every billed generation names its receipt in the ``kvgate-receipt-id`` header. A receipt
is readable once its usage row is committed; one whose event waits in the usage spool
(the database was away) answers 404 until the spool is replayed. Another tenant's receipt
answers the same 404 as one that does not exist.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web

from kvgate.gateway.config import Settings
from kvgate.gateway.edge.context import principal_of
from kvgate.gateway.http.state import state_of
from kvgate.gateway.ledger import LedgerUnavailable, NotFound
from kvgate.gateway.ledger.receipts import KEY_FILE_NAME, ReceiptKey, ReceiptKeyUnwritable
from kvgate.gateway.ledger.spool import default_spool_dir
from kvgate.gateway.protocol.errors import ApiError, bad_request

log = logging.getLogger("kvgate.http")

KEY_PATH = "/.well-known/kvgate-receipt-key"


def routes() -> list[web.RouteDef]:
    return [web.get("/v1/receipts", list_own, allow_head=False),
            web.get("/v1/receipts/{id}", retrieve, allow_head=False),
            web.get("/admin/receipts", list_any, allow_head=False),
            web.get(KEY_PATH, public_key, allow_head=False)]


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "20")
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 200:
        raise bad_request("'limit' must be an integer from 1 to 200.", param="limit")
    return int(raw)


async def _listed(request: web.Request, tenant_id: int) -> web.Response:
    try:
        data = await state_of(request).ledger.receipts(tenant_id, _limit(request))
    except LedgerUnavailable as exc:
        log.warning("receipts: %s", exc)
        raise ApiError(503, "Receipts cannot be read now: the database is unavailable. "
                       "Retry shortly.", code="ledger_unavailable", retry_after=5.0) from None
    return web.json_response({"object": "list", "data": data})


async def list_own(request: web.Request) -> web.Response:
    """``GET /v1/receipts?limit=``: the calling tenant's latest receipts, newest first."""
    tenant = principal_of(request).tenant_id
    assert tenant is not None  # the auth middleware lets only tenant keys through
    return await _listed(request, tenant)


async def list_any(request: web.Request) -> web.Response:
    """``GET /admin/receipts?tenant_id=&limit=`` (admin key): one tenant's latest receipts."""
    raw = request.query.get("tenant_id", "")
    if not raw.isascii() or not raw.isdigit() or not 0 < int(raw) < 2**31:
        raise bad_request("'tenant_id' must be a tenant id.", param="tenant_id")
    return await _listed(request, int(raw))


def default_key_file(settings: Settings) -> Path:
    """Where a generated key lives: the gateway's data directory (the spool's)."""
    return Path(settings.ledger.spool_dir or default_spool_dir(settings.ledger.db)) / KEY_FILE_NAME


def load_key(settings: Settings) -> ReceiptKey:
    """``--receipt-key-file``, else the key in the data directory (made on the first start).
    ``ReceiptKeyError`` when a key file exists but cannot be read."""
    if settings.ledger.receipt_key_file:
        return ReceiptKey.load(settings.ledger.receipt_key_file)
    try:
        return ReceiptKey.load_or_create(default_key_file(settings))
    except ReceiptKeyUnwritable as exc:  # serve anyway; receipts verify until a restart
        key = ReceiptKey.generate()
        log.error("%s; signing receipts with key %s, kept in memory only (set "
                  "--receipt-key-file to keep one)", exc, key.key_id)
        return key


async def retrieve(request: web.Request) -> web.Response:
    receipt_id = request.match_info["id"]
    tenant = principal_of(request).tenant_id
    assert tenant is not None  # the auth middleware lets only tenant keys through
    try:
        receipt = await state_of(request).ledger.receipt(receipt_id, tenant)
    except NotFound:
        raise ApiError(404, f"Receipt with id '{receipt_id[:80]}' not found (a request "
                       "billed while the ledger database was away has its receipt once "
                       "the database is back).", code="receipt_not_found") from None
    except LedgerUnavailable as exc:
        log.warning("receipts: %s", exc)
        raise ApiError(503, "Receipts cannot be read now: the database is unavailable. "
                       "Retry shortly.", code="ledger_unavailable", retry_after=5.0) from None
    return web.json_response(receipt)


async def public_key(request: web.Request) -> web.Response:
    key = state_of(request).receipt_key
    if key is None:
        raise ApiError(404, "This gateway signs no receipts.", code="not_found")
    return web.json_response(key.published(), headers={"cache-control": "max-age=300"})
