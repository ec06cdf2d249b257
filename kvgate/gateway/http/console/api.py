"""The admin endpoints behind the console: usage as a time series from the ledger, the
cache history of this process, and a tenant's hottest prefixes. Admin key only (the auth
middleware guards every ``/admin`` path but the console's own page and assets)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from kvgate.gateway.http.admin.api import ledger_error, path_id, time_range
from kvgate.gateway.http.console.history import CacheHistory, history_of, now_sample
from kvgate.gateway.http.state import state_of
from kvgate.gateway.ledger import LedgerError
from kvgate.gateway.ledger.series import BUCKETS, SPLITS, SeriesQuery, check_model
from kvgate.gateway.protocol.errors import bad_request
from kvgate.gateway.protocol.namespace import tenant_namespace

MAX_PREFIXES = 100


def _json(data: Any) -> web.Response:
    return web.Response(text=json.dumps(data), content_type="application/json")


def _choice(q: Any, name: str, allowed: tuple[str, ...], default: str) -> str:
    value = q.get(name) or default
    if value not in allowed:
        raise bad_request(f"'{name}' must be one of {', '.join(allowed)}; got {value[:40]!r}.",
                          param=name)
    return str(value)


async def usage_series(request: web.Request) -> web.Response:
    """``GET /admin/usage/series``: usage per hour or day (or over the range), optionally
    split by tenant, key or model, with what the cache saved."""
    q = request.query
    bucket = _choice(q, "bucket", BUCKETS, "hour")
    split = _choice(q, "group_by", SPLITS, "none")
    tenant, key, model = q.get("tenant_id"), q.get("key_id"), q.get("model") or None
    if model is not None:
        try:
            check_model(model)  # NUL, controls, lone surrogates: a 400 on every database
        except ValueError as exc:
            raise bad_request(f"'model': {exc}.", param="model") from None
    since, until = time_range(q)
    query = SeriesQuery(bucket=bucket, split=split,
                        tenant_id=path_id(tenant) if tenant else None,
                        key_id=path_id(key, "key") if key else None,
                        model=model, since=since, until=until)
    try:
        query = query.checked()
    except ValueError as exc:  # the ledger's InvalidInput: too many buckets, an empty range,
        # a default span that would start before year 1 (only ``until`` given)
        raise bad_request(f"{exc}.", param="since" if since is not None else "until") from None
    try:
        return _json(await state_of(request).ledger.usage_series(query))
    except LedgerError as exc:
        raise ledger_error(exc) from None


async def cache_history(request: web.Request) -> web.Response:
    """``GET /admin/cache/history``: this process's sampled cache statistics, oldest first,
    ending with a sample taken now."""
    history: CacheHistory = history_of(request)
    now = now_sample(request)
    return _json({"interval_s": history.interval_s, "capacity": history.capacity,
                  "points": history.points(now), "totals": history.totals(now)})


async def hot_prefixes(request: web.Request) -> web.Response:
    """``GET /admin/cache/prefixes?tenant_id=&limit=``: the tenant's most-hit cached
    prefixes: hash, length in tokens, hits, tier, last use. Never the text."""
    state = state_of(request)
    raw = request.query.get("tenant_id")
    if not raw:
        raise bad_request("Query parameter 'tenant_id' is required.", param="tenant_id")
    tid = path_id(raw)
    raw_limit = request.query.get("limit") or "10"
    if not (raw_limit.isascii() and raw_limit.isdigit()) or not 1 <= int(raw_limit) <= MAX_PREFIXES:
        raise bad_request(f"'limit' must be an integer from 1 to {MAX_PREFIXES}.", param="limit")
    try:
        await state.ledger.get_tenant(tid)
    except LedgerError as exc:
        raise ledger_error(exc) from None
    engine = state.engine
    hot = await engine.hottest(tenant_namespace(tid), int(raw_limit))
    wall = time.time()
    return _json({"tenant_id": tid, "block_size": engine.block_size, "prefixes": [
        {**p.as_dict(), "last_used": datetime.fromtimestamp(wall - p.idle_s, UTC)
         .isoformat().replace("+00:00", "Z")} for p in hot]})


def routes() -> list[web.RouteDef]:
    return [
        web.get("/admin/usage/series", usage_series, allow_head=False),
        web.get("/admin/cache/history", cache_history, allow_head=False),
        web.get("/admin/cache/prefixes", hot_prefixes, allow_head=False),
    ]
