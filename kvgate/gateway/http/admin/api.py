"""/admin routes (admin key only; enforced by the auth middleware)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

from aiohttp import web

from kvgate.gateway.edge.body import read_json
from kvgate.gateway.http.state import state_of
from kvgate.gateway.ledger import Conflict, InvalidInput, LedgerError, NotFound
from kvgate.gateway.ledger.budgets import MAX_BUDGET
from kvgate.gateway.ledger.reports import GROUPS
from kvgate.gateway.ledger.timespec import check_range, parse_time
from kvgate.gateway.protocol.errors import ApiError, bad_request
from kvgate.gateway.protocol.namespace import tenant_namespace

_TENANT_FIELDS: dict[str, type | tuple[type, ...]] = {
                  "name": str, "plan": (str, int), "cache_ttl_seconds": int,
                  "cache_quota_bytes": int, "cache_reserved_device_bytes": int,
                  "cache_reserved_host_bytes": int, "cache_max_ttl_seconds": int,
                  "cache_share_bytes": int,  # the former name: a reservation on both tiers
                  "requests_per_minute": int,
                  "tokens_per_minute": int, "max_concurrent": int, "status": str,
                  "budget_daily_micros": int, "budget_monthly_micros": int,
                  "min_priority": int, "max_running_sequences": int}
_BUDGETS = ("budget_daily_micros", "budget_monthly_micros")  # tenants' and keys' own


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, default=_default), status=status,
                        content_type="application/json")


def _default(obj: object) -> str:
    if isinstance(obj, (datetime, date)):
        return obj.isoformat()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


_ID = re.compile(r"[0-9]{1,10}")
_MAX_ID = 2**31 - 1  # tenant and key ids are 32-bit INTEGER columns on PostgreSQL


def path_id(raw: str, what: str = "tenant") -> int:
    """A database id from a path or query: ASCII digits within the id column's range.
    Anything else names no row, so it is a 404 (never a 500 from the database)."""
    if not _ID.fullmatch(raw) or int(raw) > _MAX_ID:
        raise ApiError(404, f"No {what} has the id {raw[:40]!r}; ids are positive integers.",
                       code="not_found")
    return int(raw)


def ledger_error(exc: LedgerError) -> ApiError:
    if isinstance(exc, NotFound):
        return ApiError(404, str(exc) or "Not found.", code="not_found")
    if isinstance(exc, Conflict):
        return ApiError(409, str(exc) or "Conflict.", code="conflict")
    if isinstance(exc, ValueError):  # the ledger's InvalidInput
        return bad_request(str(exc) or "Invalid request.")
    return ApiError(503, f"Ledger unavailable: {exc}", code="ledger_error", retry_after=1.0)


_INT32_MAX, _INT64_MAX = 2**31 - 1, 2**63 - 1
# The largest value each integer field's column holds on every database (INTEGER is 32-bit
# on PostgreSQL; SQLite and BIGINT take 64 bits); beyond it the database would refuse.
_INT_MAX = {"cache_quota_bytes": _INT64_MAX, "cache_share_bytes": _INT64_MAX,
            "cache_reserved_device_bytes": _INT64_MAX, "cache_reserved_host_bytes": _INT64_MAX,
            "plan": _INT32_MAX, **dict.fromkeys(_BUDGETS, MAX_BUDGET)}
# Integer fields whose range is not 0 to the column's largest value (null resets both: the
# default priority floor 0, no running cap)
_INT_RANGE = {"min_priority": (-1000, 1000), "max_running_sequences": (1, _INT32_MAX)}
_RESERVATIONS = ("cache_reserved_device_bytes", "cache_reserved_host_bytes")
# Characters no name may hold: C0/C1 controls (PostgreSQL refuses NUL in text outright).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _tenant_fields(body: dict, allowed: set[str]) -> dict:
    """Typed and bounded, so nothing reaches the database that it would refuse with an
    error of its own: integers within their column's range, plan ids as ASCII digits,
    names without control characters."""
    out = {}
    for name, value in body.items():
        if name not in allowed:
            raise bad_request(f"Unknown field '{name[:40]}'; allowed: "
                              f"{', '.join(sorted(allowed))}.", param=name[:40])
        kind = _TENANT_FIELDS[name]
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise bad_request(f"Field '{name}' has the wrong type.", param=name)
        if isinstance(value, int):
            low, top = _INT_RANGE.get(name, (0, _INT_MAX.get(name, _INT32_MAX)))
            if not low <= value <= top:
                raise bad_request(f"Field '{name}' must be between {low} and {top}.",
                                  param=name)
        if isinstance(value, str):
            value = _text_field(name, value)
        out[name] = value
    if "cache_share_bytes" in out:  # the former guaranteed share: a reservation on each tier
        share = out.pop("cache_share_bytes")
        for name in _RESERVATIONS:
            out.setdefault(name, share)
    return out


def _capacity(request: web.Request) -> dict[str, int]:
    """What each reservation field may total over all tenants: this replica's tiers."""
    tiers = state_of(request).engine.tier_bytes()
    return {"cache_reserved_device_bytes": tiers["device"],
            "cache_reserved_host_bytes": tiers["host"]}


def _push(request: web.Request, tid: int, tenant: dict[str, Any]) -> None:
    """The tenant's quota and reservation, to this replica's cache now."""
    state_of(request).quotas.set(tid, tenant["cache_quota_bytes"],
                                 (tenant["cache_reserved_device_bytes"],
                                  tenant["cache_reserved_host_bytes"]))


def _text_field(name: str, value: str) -> str | int:
    if _CONTROL.search(value):
        raise bad_request(f"Field '{name}' must not hold control characters.", param=name)
    if name == "plan" and value.strip().isdigit():  # an id, as the ledger reads digits
        if not _ID.fullmatch(value.strip()) or int(value) > _INT32_MAX:
            raise bad_request(f"Field 'plan' looks like a plan id but is not one: ids are "
                              f"ASCII digits up to {_INT32_MAX}.", param=name)
        return int(value)
    return value


async def create_tenant(request: web.Request) -> web.Response:
    body = await read_json(request)
    fields = _tenant_fields(body, set(_TENANT_FIELDS) - {"status"})
    if not isinstance(fields.get("name"), str) or not fields["name"].strip():
        raise bad_request("Field 'name' is required.", param="name")
    try:
        tenant = await state_of(request).ledger.create_tenant(**fields,
                                                               capacity=_capacity(request))
    except LedgerError as exc:
        raise ledger_error(exc) from None
    _push(request, tenant["id"], tenant)
    return _json(tenant, status=201)


async def list_tenants(request: web.Request) -> web.Response:
    try:
        return _json({"object": "list", "data": await state_of(request).ledger.list_tenants()})
    except LedgerError as exc:
        raise ledger_error(exc) from None


async def get_tenant(request: web.Request) -> web.Response:
    try:
        return _json(await state_of(request).ledger.get_tenant(
            path_id(request.match_info["id"])))
    except LedgerError as exc:
        raise ledger_error(exc) from None


async def update_tenant(request: web.Request) -> web.Response:
    state = state_of(request)
    tid = path_id(request.match_info["id"])
    fields = _tenant_fields(await read_json(request), set(_TENANT_FIELDS))
    try:
        tenant = await state.ledger.update_tenant(tid, capacity=_capacity(request), **fields)
    except LedgerError as exc:
        raise ledger_error(exc) from None
    if {"cache_quota_bytes", *_RESERVATIONS} & set(fields):
        _push(request, tid, tenant)
    else:
        state.quotas.forget(tid)  # re-applied from the key's principal on the next request
    if set(_BUDGETS) & set(fields):
        state.budgets.budgets_changed(tid, *(tenant[b] for b in _BUDGETS))
    return _json(tenant)


async def delete_tenant(request: web.Request) -> web.Response:
    state = state_of(request)
    tid = path_id(request.match_info["id"])
    try:
        await state.ledger.delete_tenant(tid)
    except LedgerError as exc:
        raise ledger_error(exc) from None
    await state.engine.flush(tenant_namespace(tid))
    state.quotas.set(tid, None)  # no quota, no reservation: nothing is held for it now
    state.quotas.forget(tid)
    state.budgets.budgets_changed(tid, None, None)
    state.metrics.forget_tenant(tid)
    return _json({"id": tid, "deleted": True})


async def create_key(request: web.Request) -> web.Response:
    tid = path_id(request.match_info["id"])
    role = "tenant"
    budgets: dict[str, Any] = {}
    if request.can_read_body:
        body = await read_json(request)
        role = body.pop("role", "tenant")
        if role not in ("tenant", "admin"):
            raise bad_request("Field 'role' must be 'tenant' or 'admin'.", param="role")
        budgets = _tenant_fields(body, set(_BUDGETS))
    try:
        key = await state_of(request).ledger.create_key(tid, role=role, **budgets)
    except LedgerError as exc:
        raise ledger_error(exc) from None
    return _json(key, status=201)


async def list_keys(request: web.Request) -> web.Response:
    try:
        keys = await state_of(request).ledger.list_keys(path_id(request.match_info["id"]))
    except LedgerError as exc:
        raise ledger_error(exc) from None
    return _json({"object": "list", "data": keys})


async def update_key(request: web.Request) -> web.Response:
    """``PATCH /admin/keys/{id}``: the key's own budgets (null clears one)."""
    kid = path_id(request.match_info["id"], "key")
    budgets = _tenant_fields(await read_json(request), set(_BUDGETS))
    try:
        return _json(await state_of(request).ledger.update_key(kid, **budgets))
    except LedgerError as exc:
        raise ledger_error(exc) from None


async def tenant_budget(request: web.Request) -> web.Response:
    """``GET /admin/tenants/{id}/budget``: budgets and spend this UTC day and month, the
    tenant's and each key's (``Ledger.budget_status``)."""
    try:
        return _json(await state_of(request).ledger.budget_status(
            path_id(request.match_info["id"])))
    except LedgerError as exc:
        raise ledger_error(exc) from None


async def revoke_key(request: web.Request) -> web.Response:
    kid = path_id(request.match_info["id"], "key")
    try:
        await state_of(request).ledger.revoke_key(kid)
    except LedgerError as exc:
        raise ledger_error(exc) from None
    return _json({"id": kid, "revoked": True})


def time_range(q: Mapping[str, str]) -> tuple[datetime | None, datetime | None]:
    """``since``/``until`` by the ledger's one parser (the CLI's too); a bad one is a 400
    naming the parameter."""
    ends: dict[str, datetime | None] = {}
    for name in ("since", "until"):
        raw = q.get(name)
        try:
            ends[name] = parse_time(raw) if raw and raw.strip() else None
        except InvalidInput as exc:
            raise bad_request(f"'{name}': {exc}.", param=name) from None
    try:
        check_range(ends["since"], ends["until"])
    except InvalidInput as exc:
        raise bad_request(f"{exc}.", param="until") from None
    return ends["since"], ends["until"]


async def usage(request: web.Request) -> web.Response:
    q = request.query
    group_by = q.get("group_by") or "day"
    if group_by not in GROUPS:
        raise bad_request(f"'group_by' must be one of {', '.join(GROUPS)}; "
                          f"got {group_by[:40]!r}.", param="group_by")
    tenant = q.get("tenant_id")
    tenant_id = path_id(tenant) if tenant else None
    since, until = time_range(q)
    try:
        report = await state_of(request).ledger.usage_report(
            tenant_id=tenant_id, since=since, until=until, group_by=group_by)
    except LedgerError as exc:
        raise ledger_error(exc) from None
    return _json(report)


async def cache_stats(request: web.Request) -> web.Response:
    """The cachestore snapshot as is, with its namespaces shown as tenants (id and name).
    Deleted tenants are named too: their blocks may still be leaving the cache."""
    state = state_of(request)
    snapshot = await state.engine.stats()
    stats = snapshot.as_dict()
    del stats["namespaces"]
    try:
        tenants = await state.ledger.list_tenants(include_deleted=True)
    except LedgerError as exc:
        raise ledger_error(exc) from None
    names = {tenant_namespace(t["id"]): (t["id"], t["name"]) for t in tenants}
    stats["tenants"] = [
        {"namespace": ns, "tenant_id": names.get(ns, (None, None))[0],
         "tenant_name": names.get(ns, (None, None))[1], **v.as_dict()}
        for ns, v in sorted(snapshot.namespaces.items())]
    return _json(stats)


async def flush_cache(request: web.Request) -> web.Response:
    state = state_of(request)
    tenant = request.query.get("tenant_id")
    if not tenant:
        raise bad_request("Query parameter 'tenant_id' is required.", param="tenant_id")
    tid = path_id(tenant)
    try:
        await state.ledger.get_tenant(tid)
    except LedgerError as exc:
        raise ledger_error(exc) from None
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
        web.get("/admin/tenants/{id}/budget", tenant_budget, allow_head=False),
        web.patch("/admin/keys/{id}", update_key),
        web.delete("/admin/keys/{id}", revoke_key),
        web.get("/admin/usage", usage, allow_head=False),
        web.get("/admin/cache/stats", cache_stats, allow_head=False),
        web.delete("/admin/cache", flush_cache),
    ]
