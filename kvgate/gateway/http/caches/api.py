"""Explicit caches (``/v1/caches``): a prompt prefix a tenant asks to keep for a set time.

- ``POST /v1/caches``: the prefix in either API's shape (OpenAI ``messages`` and ``tools``,
  or Anthropic ``system``, ``messages`` and ``tools``), ``ttl`` (``"3600s"``) or
  ``ttl_seconds``, ``display_name``, ``model``. The prefix is rendered by the chat
  template exactly as the same leading messages of a later request are (the tokens a
  request that goes on with a user or an assistant turn shares with it), computed once
  by a one-token generation whose output is discarded (billed as any request: endpoint
  ``caches``, uncached input and cache writes), and its blocks are pinned in the tenant's
  namespace until the cache expires or is deleted.
- ``cached_content: "cache_…"`` in a chat completions or Messages body puts the cache's
  messages (and its tools, its system prompt) in front of the request's own, so its prompt
  starts with the cache's tokens and reads its pinned blocks. A request that merely starts
  with the same tokens hits them as well.
- The ledger keeps every cache (table ``explicit_caches``), so another replica, or this one
  after a restart, pins a cache on its first use: the request that names it computes the
  prefix (billed as usual) and its blocks are pinned as they are written.
- Bounded per tenant: the tokens of its live caches × KV bytes per token fit in its device
  reservation, else its quota, else ``explicit_cache_device_percent`` of the device tier
  (409 saying what is left).
- Storage is billed per token-hour (``reservations.CacheStorageBiller``); expired caches
  are unpinned by the same task's sweep.

Another tenant's id answers exactly as an id that never existed (404).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jinja2
from aiohttp import web

from kvgate.gateway.edge.body import prepare, read_body
from kvgate.gateway.engine import EngineUnavailable, SamplingParams
from kvgate.gateway.http.admission import admitted
from kvgate.gateway.http.caches.named import (
    ID_PREFIX,
    cache_row,
    not_found,
    tenant_of,
    unavailable,
)
from kvgate.gateway.http.generation import Generation
from kvgate.gateway.http.openai.models import served_names
from kvgate.gateway.http.state import AppState, state_of
from kvgate.gateway.http.validation import check_model
from kvgate.gateway.ledger import CacheBudgetExceeded, LedgerUnavailable, NotFound, Principal
from kvgate.gateway.protocol.anthropic import common_prefix, parse_conversation
from kvgate.gateway.protocol.errors import ApiError, bad_request
from kvgate.gateway.protocol.namespace import tenant_namespace
from kvgate.gateway.protocol.openai_chat import chat_messages, openai_usage
from kvgate.gateway.protocol.openai_tools import tool_request

_TTL = re.compile(r"([0-9]{1,9})s")  # Gemini's Duration: whole seconds here
DISPLAY_NAME_MAX = 128
_FIELDS = {"messages", "tools", "system", "ttl", "ttl_seconds", "display_name", "model"}
_ANTHROPIC_BLOCKS = {"tool_use", "tool_result", "image", "document"}
# Stand-in turns after the prefix: what a later request shares with it is what two
# renderings that go on differently have in common.
_STAND_INS = ({"role": "user", "content": "\u2026"}, {"role": "assistant", "content": "\u2026"})


def routes() -> list[web.RouteDef]:
    return [web.post("/v1/caches", create),
            web.get("/v1/caches", list_caches, allow_head=False),
            web.get("/v1/caches/{id}", retrieve, allow_head=False),
            web.patch("/v1/caches/{id}", update),
            web.delete("/v1/caches/{id}", delete),
            web.get("/admin/caches", admin_list, allow_head=False)]


def new_cache_id() -> str:
    return ID_PREFIX + secrets.token_urlsafe(24)  # 192 random bits


@dataclass(frozen=True)
class Prefix:
    """A cache's prefix: as stored (the request's own shape) and as the engine sees it."""

    stored: dict[str, Any]  # {"api": "openai" | "anthropic", "messages", "tools", "system"}
    model: str
    ids: list[int]


# -- the prefix --------------------------------------------------------------------------------


def _is_anthropic(body: dict[str, Any]) -> bool:
    """Anthropic's shape: a top-level ``system``, tools with ``input_schema``, or content
    blocks only Messages has."""
    if body.get("system") is not None:
        return True
    tools = body.get("tools")
    if isinstance(tools, list) and any(isinstance(t, dict) and "input_schema" in t
                                       for t in tools):
        return True
    for m in body.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and any(
                isinstance(b, dict) and b.get("type") in _ANTHROPIC_BLOCKS for b in content):
            return True
    return False


def template_of(state: AppState, stored: dict[str, Any]
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The chat template's messages and tools of a stored prefix (validated as its API
    validates a request)."""
    if stored["api"] == "anthropic":
        conv = parse_conversation({k: v for k, v in stored.items() if k != "api"})
        return conv.template_messages(), conv.tool_specs()
    body = {k: v for k, v in stored.items() if k != "api"}
    return chat_messages(body), tool_request(body, state.tool_parser).tools


def render_prefix(state: AppState, stored: dict[str, Any]) -> list[int]:
    """The tokens every request that begins with these messages (and tools) begins with."""
    messages, tools = template_of(state, stored)
    engine = state.engine
    try:
        full = list(engine.render_chat(messages, tools=tools))
    except jinja2.TemplateError as exc:
        raise bad_request(f"This model's chat template refused the messages: {exc}",
                          param="messages", code="invalid_value") from None
    end = len(full)
    for turn in _STAND_INS:
        try:
            end = min(end, common_prefix(full, list(engine.render_chat([*messages, turn],
                                                                 tools=tools))))
        except jinja2.TemplateError:  # a template that wants roles to alternate
            continue
    return full[:end]


def parse_create(state: AppState, body: dict[str, Any]) -> tuple[Prefix, float | None, str | None]:
    """(prefix, TTL seconds asked or None, display name) of a ``POST /v1/caches`` body."""
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object.", code="invalid_type")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise bad_request(f"Unknown field {unknown[0][:40]!r}; a cache takes "
                          f"{', '.join(sorted(_FIELDS))}.", param=unknown[0][:40],
                          code="unknown_parameter")
    ttl = parse_ttl(body)
    name = body.get("display_name")
    if name is not None and (not isinstance(name, str) or len(name) > DISPLAY_NAME_MAX
                             or not name.isprintable()):
        raise bad_request(f"'display_name' must be printable text of at most "
                          f"{DISPLAY_NAME_MAX} characters.", param="display_name",
                          code="invalid_value")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string.", param="model", code="invalid_type")
    model = check_model(state, model) if model else served_names(state)[0]
    api = "anthropic" if _is_anthropic(body) else "openai"
    stored: dict[str, Any] = {"api": api, "messages": body.get("messages")}
    for key in ("system", "tools"):
        if body.get(key) is not None:
            stored[key] = body[key]
    ids = render_prefix(state, stored)
    block = state.settings.cache.block_size
    if len(ids) < block:
        raise bad_request(f"The prefix renders to {len(ids)} tokens; a cache holds whole "
                          f"blocks of {block} tokens, so it needs at least {block}.",
                          param="messages", code="cache_too_small")
    return Prefix(stored, model, ids), ttl, name


def parse_ttl(body: dict[str, Any]) -> float | None:
    """``ttl`` ("3600s") or ``ttl_seconds`` (3600); None when neither is sent."""
    ttl, seconds = body.get("ttl"), body.get("ttl_seconds")
    if ttl is not None and seconds is not None:
        raise bad_request("Send 'ttl' or 'ttl_seconds', not both.", param="ttl")
    if ttl is not None:
        m = _TTL.fullmatch(ttl) if isinstance(ttl, str) else None
        if m is None:
            raise bad_request("'ttl' must be whole seconds followed by 's', e.g. \"3600s\".",
                              param="ttl", code="invalid_value")
        value = int(m.group(1))
    elif seconds is not None:
        if not isinstance(seconds, int) or isinstance(seconds, bool):
            raise bad_request("'ttl_seconds' must be an integer.", param="ttl_seconds",
                              code="invalid_type")
        value = seconds
    else:
        return None
    if value < 1:
        raise bad_request("A cache's TTL must be at least 1 second.", param="ttl",
                          code="invalid_value")
    return float(value)


def _ttl_for(state: AppState, p: Principal, asked: float | None) -> float:
    if asked is None:
        return float(p.cache_ttl_seconds or state.settings.cache.default_cache_ttl_seconds)
    if asked > p.cache_max_ttl_seconds:
        raise bad_request(f"A TTL of {int(asked)} s is longer than this tenant may keep a "
                          f"cache ({p.cache_max_ttl_seconds} s).", param="ttl",
                          code="invalid_value")
    return asked


def budget_tokens(state: AppState, p: Principal) -> int:
    """The most tokens the tenant's live caches may hold together: its device
    reservation, else its quota, else a share of the device tier, in tokens."""
    engine = state.engine
    page_bytes = engine.page_bytes
    if p.cache_reserved_device_bytes:
        nbytes = p.cache_reserved_device_bytes
    elif p.cache_quota_bytes is not None:
        nbytes = p.cache_quota_bytes
    else:
        percent = max(0, min(100, state.settings.cache.explicit_cache_device_percent))
        nbytes = engine.tier_bytes()["device"] * percent // 100
    return min(nbytes * engine.block_size // page_bytes, total_budget_tokens(state))


def total_budget_tokens(state: AppState) -> int:
    """The most tokens every tenant's live caches may hold together (each replica pins
    those named there): ``explicit_cache_total_percent`` of the device tier, so pinned
    prefixes never take the pages running requests need."""
    engine = state.engine
    percent = max(0, min(100, state.settings.cache.explicit_cache_total_percent))
    nbytes = engine.tier_bytes()["device"] * percent // 100
    return nbytes * engine.block_size // engine.page_bytes


# -- answers -----------------------------------------------------------------------------------


def cache_object(row: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    expires: datetime = row["expires_at"]
    return {"id": row["id"], "object": "cache", "display_name": row["display_name"],
            "model": row["model"], "tokens": row["tokens"],
            "created_at": int(row["created_at"].timestamp()),
            "expires_at": int(expires.timestamp()),
            "ttl_seconds": max(0, round((expires - now).total_seconds()))}


# -- handlers ----------------------------------------------------------------------------------

_creating: dict[int, asyncio.Lock] = {}  # per tenant: one budget check at a time here


@admitted
async def create(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    p = tenant_of(request)
    assert p.tenant_id is not None
    prefix, asked, name = await prepare(await read_body(request),
                                        lambda body: parse_create(state, body))
    ttl_s = _ttl_for(state, p, asked)
    budget = budget_tokens(state, p)
    lock = _creating.setdefault(p.tenant_id, asyncio.Lock())
    async with lock:
        try:
            held = sum(c["tokens"] for c in await state.ledger.list_caches(p.tenant_id))
        except LedgerUnavailable:
            raise unavailable() from None
        if held + len(prefix.ids) > budget:
            raise _over_budget(CacheBudgetExceeded(len(prefix.ids), max(0, budget - held),
                                                   budget))
        cache_id = new_cache_id()
        ns = state.quotas.apply(p)
        await state.engine.pin(ns, prefix.ids, cache_id)  # blocks written now are pinned
        try:
            gen = await _compute(request, prefix)
            expires = datetime.now(UTC) + timedelta(seconds=ttl_s)
            row = await state.ledger.create_cache(
                cache_id, p.tenant_id, display_name=name, model=prefix.model,
                prefix=json.dumps(prefix.stored, separators=(",", ":")),
                tokens=len(prefix.ids), expires_at=expires, max_tokens=budget,
                max_total_tokens=total_budget_tokens(state))
        except BaseException as exc:
            await state.engine.unpin(ns, cache_id)
            if isinstance(exc, CacheBudgetExceeded):
                raise _over_budget(exc) from None
            if isinstance(exc, LedgerUnavailable):
                raise unavailable() from None
            raise
    # and those that were cached before; a core restarting now pins it when it is back (the
    # pin stands in its client), so the cache the ledger holds is answered as created
    with contextlib.suppress(EngineUnavailable):
        await state.engine.pin(ns, prefix.ids, cache_id)
    state.explicit_caches[cache_id] = ns
    body = cache_object(row)
    if gen.usage is not None:
        body["usage"] = openai_usage(gen.usage)
    return web.json_response(body)


async def _compute(request: web.Request, prefix: Prefix) -> Generation:
    """One token generated over the prefix and discarded: the prefix's KV is computed and
    written to the cache, billed as this request (endpoint ``caches``)."""
    sampling = SamplingParams(max_tokens=1, temperature=0.0)
    async with Generation(request, "caches", prefix.model, prefix.ids, sampling) as gen:
        await gen.run()
    return gen


def _over_budget(exc: CacheBudgetExceeded) -> ApiError:
    return ApiError(409, f"This cache is {exc.tokens} tokens; this tenant's explicit caches "
                    f"may hold {exc.budget} tokens together and {exc.left} are left. Delete "
                    "a cache or wait for one to expire.", code="cache_budget_exceeded")


async def list_caches(request: web.Request) -> web.Response:
    state = state_of(request)
    p = tenant_of(request)
    assert p.tenant_id is not None
    try:
        rows = await state.ledger.list_caches(p.tenant_id)
    except LedgerUnavailable:
        raise unavailable() from None
    now = datetime.now(UTC)
    return web.json_response({"object": "list", "data": [cache_object(r, now) for r in rows]})


async def admin_list(request: web.Request) -> web.Response:
    """``GET /admin/caches?tenant_id=`` (admin key): a tenant's live explicit caches, as the
    tenant lists them (never their text), for the console."""
    raw = request.query.get("tenant_id", "")
    if not raw.isascii() or not raw.isdigit() or not 0 < int(raw) < 2**31:
        raise bad_request("'tenant_id' must be a tenant id.", param="tenant_id")
    try:
        rows = await state_of(request).ledger.list_caches(int(raw))
    except LedgerUnavailable:
        raise unavailable() from None
    now = datetime.now(UTC)
    return web.json_response({"object": "list", "data": [cache_object(r, now) for r in rows]})


async def retrieve(request: web.Request) -> web.Response:
    state = state_of(request)
    p = tenant_of(request)
    assert p.tenant_id is not None
    return web.json_response(cache_object(await cache_row(state, request.match_info["id"],
                                                     p.tenant_id, param=None)))


async def update(request: web.Request) -> web.Response:
    """A new TTL, counted from now (the prefix cannot change: make another cache)."""
    state = state_of(request)
    p = tenant_of(request)
    assert p.tenant_id is not None
    cache_id = request.match_info["id"]
    body = await prepare(await read_body(request), lambda b: b)
    if not isinstance(body, dict) or set(body) - {"ttl", "ttl_seconds"}:
        raise bad_request("A cache's update takes 'ttl' or 'ttl_seconds' only.", param="ttl")
    asked = parse_ttl(body)
    if asked is None:
        raise bad_request("Send 'ttl' or 'ttl_seconds'.", param="ttl", code="missing_field")
    ttl_s = _ttl_for(state, p, asked)
    await cache_row(state, cache_id, p.tenant_id, param=None)
    try:
        row = await state.ledger.update_cache(cache_id, p.tenant_id,
                                              datetime.now(UTC) + timedelta(seconds=ttl_s))
    except NotFound:
        raise not_found(cache_id, None) from None
    except LedgerUnavailable:
        raise unavailable() from None
    return web.json_response(cache_object(row))


async def delete(request: web.Request) -> web.Response:
    state = state_of(request)
    p = tenant_of(request)
    assert p.tenant_id is not None
    cache_id = request.match_info["id"]
    await cache_row(state, cache_id, p.tenant_id, param=None)
    try:
        await state.ledger.delete_cache(cache_id, p.tenant_id)
    except NotFound:
        raise not_found(cache_id, None) from None
    except LedgerUnavailable:
        raise unavailable() from None
    state.explicit_caches.pop(cache_id, None)
    await state.engine.unpin(tenant_namespace(p.tenant_id), cache_id)
    return web.json_response({"id": cache_id, "object": "cache.deleted", "deleted": True})


