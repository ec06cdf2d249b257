"""/admin routes (admin key only; enforced by the auth middleware)."""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import Any

from aiohttp import web

from gateway.http.backends import Conflict, LedgerError, NotFound
from gateway.http.errors import ApiError, bad_request
from gateway.http.state import state_of, tenant_namespace
from gateway.http.validation import read_json

_TENANT_FIELDS = {"name": str, "plan": (str, int), "cache_ttl_seconds": int,
                  "cache_quota_bytes": int, "requests_per_minute": int,
                  "tokens_per_minute": int, "max_concurrent": int, "status": str}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, default=_default), status=status,
                        content_type="application/json")


def _default(obj: Any) -> Any:
    if isinstance(obj, (datetime, date)):
        return obj.isoformat()
    if hasattr(obj, "_asdict"):
        return obj._asdict()
    if hasattr(obj, "__dict__"):
        return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    return str(obj)


def _id(raw: str) -> int | str:
    return int(raw) if raw.isdigit() else raw


def _ledger_error(exc: LedgerError) -> ApiError:
    if isinstance(exc, NotFound):
        return ApiError(404, str(exc) or "Not found.", code="not_found")
    if isinstance(exc, Conflict):
        return ApiError(409, str(exc) or "Conflict.", code="conflict")
    if isinstance(exc, ValueError):  # the ledger's InvalidInput
        return bad_request(str(exc) or "Invalid request.")
    return ApiError(503, f"Ledger unavailable: {exc}", code="ledger_error", retry_after=1.0)


def _tenant_fields(body: dict, allowed: set[str]) -> dict:
    out = {}
    for name, value in body.items():
        if name not in allowed:
            raise bad_request(f"Unknown field '{name}'; allowed: {', '.join(sorted(allowed))}.",
                              param=name)
        kind = _TENANT_FIELDS[name]
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise bad_request(f"Field '{name}' has the wrong type.", param=name)
        if isinstance(value, int) and value < 0:
            raise bad_request(f"Field '{name}' must not be negative.", param=name)
        out[name] = value
    return out


async def create_tenant(request: web.Request) -> web.Response:
    body = await read_json(request)
    fields = _tenant_fields(body, set(_TENANT_FIELDS) - {"status"})
    if not isinstance(fields.get("name"), str) or not fields["name"].strip():
        raise bad_request("Field 'name' is required.", param="name")
    try:
        tenant = await state_of(request).ledger.create_tenant(**fields)
    except LedgerError as exc:
        raise _ledger_error(exc) from None
    return _json(tenant, status=201)


async def list_tenants(request: web.Request) -> web.Response:
    return _json({"object": "list", "data": await state_of(request).ledger.list_tenants()})


async def get_tenant(request: web.Request) -> web.Response:
    try:
        return _json(await state_of(request).ledger.get_tenant(
            _id(request.match_info["id"])))
    except LedgerError as exc:
        raise _ledger_error(exc) from None


async def update_tenant(request: web.Request) -> web.Response:
    state = state_of(request)
    tid = _id(request.match_info["id"])
    fields = _tenant_fields(await read_json(request), set(_TENANT_FIELDS))
    try:
        tenant = await state.ledger.update_tenant(tid, **fields)
    except LedgerError as exc:
        raise _ledger_error(exc) from None
    state.forget_quota(tid)  # re-applied from the key's principal on the next request
    if "cache_quota_bytes" in fields:
        state.engine.set_quota(tenant_namespace(tid), fields["cache_quota_bytes"])
    return _json(tenant)


async def delete_tenant(request: web.Request) -> web.Response:
    state = state_of(request)
    tid = _id(request.match_info["id"])
    try:
        await state.ledger.delete_tenant(tid)
    except LedgerError as exc:
        raise _ledger_error(exc) from None
    await state.engine.flush(tenant_namespace(tid))
    state.forget_quota(tid)
    return _json({"id": tid, "deleted": True})


async def create_key(request: web.Request) -> web.Response:
    tid = _id(request.match_info["id"])
    role = "tenant"
    if request.can_read_body:
        body = await read_json(request)
        role = body.get("role", "tenant")
        if role not in ("tenant", "admin"):
            raise bad_request("Field 'role' must be 'tenant' or 'admin'.", param="role")
    try:
        key = await state_of(request).ledger.create_key(tid, role=role)
    except LedgerError as exc:
        raise _ledger_error(exc) from None
    return _json(key, status=201)


async def list_keys(request: web.Request) -> web.Response:
    try:
        keys = await state_of(request).ledger.list_keys(_id(request.match_info["id"]))
    except LedgerError as exc:
        raise _ledger_error(exc) from None
    return _json({"object": "list", "data": keys})


async def revoke_key(request: web.Request) -> web.Response:
    kid = _id(request.match_info["id"])
    try:
        await state_of(request).ledger.revoke_key(kid)
    except LedgerError as exc:
        raise _ledger_error(exc) from None
    return _json({"id": kid, "revoked": True})


def _when(raw: str | None, name: str) -> datetime | None:
    if not raw:
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise bad_request(f"'{name}' must be an ISO 8601 date or time.", param=name) from None


async def usage(request: web.Request) -> web.Response:
    q = request.query
    group_by = q.get("group_by", "day")
    if group_by not in ("day", "model"):
        raise bad_request("'group_by' must be 'day' or 'model'.", param="group_by")
    tenant = q.get("tenant_id")
    try:
        report = await state_of(request).ledger.usage_report(
            tenant_id=_id(tenant) if tenant else None, since=_when(q.get("since"), "since"),
            until=_when(q.get("until"), "until"), group_by=group_by)
    except LedgerError as exc:
        raise _ledger_error(exc) from None
    return _json(report)


async def cache_stats(request: web.Request) -> web.Response:
    """The cachestore snapshot as is, with its namespaces shown as tenants (id and name)."""
    state = state_of(request)
    stats = dict(await state.engine.stats())
    namespaces = stats.pop("namespaces", None) or {}
    try:
        names = {tenant_namespace(t["id"]): (t["id"], t["name"])
                 for t in await state.ledger.list_tenants()}
    except Exception:
        names = {}
    stats["tenants"] = [
        {"namespace": ns, "tenant_id": names.get(ns, (None, None))[0],
         "tenant_name": names.get(ns, (None, None))[1], **(v if isinstance(v, dict) else {})}
        for ns, v in namespaces.items()]
    return _json(stats)


async def flush_cache(request: web.Request) -> web.Response:
    state = state_of(request)
    tenant = request.query.get("tenant_id")
    if not tenant:
        raise bad_request("Query parameter 'tenant_id' is required.", param="tenant_id")
    tid = _id(tenant)
    try:
        await state.ledger.get_tenant(tid)
    except LedgerError as exc:
        raise _ledger_error(exc) from None
    flushed = await state.engine.flush(tenant_namespace(tid))
    return _json({"tenant_id": tid, "flushed_blocks": flushed})


def routes() -> list[web.RouteDef]:
    return [
        web.post("/admin/tenants", create_tenant),
        web.get("/admin/tenants", list_tenants, allow_head=False),
        web.get("/admin/tenants/{id}", get_tenant, allow_head=False),
        web.patch("/admin/tenants/{id}", update_tenant),
        web.delete("/admin/tenants/{id}", delete_tenant),
        web.post("/admin/tenants/{id}/keys", create_key),
        web.get("/admin/tenants/{id}/keys", list_keys, allow_head=False),
        web.delete("/admin/keys/{id}", revoke_key),
        web.get("/admin/usage", usage, allow_head=False),
        web.get("/admin/cache/stats", cache_stats, allow_head=False),
        web.delete("/admin/cache", flush_cache),
    ]
