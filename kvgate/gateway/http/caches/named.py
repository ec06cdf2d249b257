"""Requests that name an explicit cache: ``cached_content: "cache_…"`` (``caches.api``).

The cache's messages, tools and system prompt go in front of the request's own, in the
request's API shape (a prefix made in the other API's shape is converted when it holds only
text turns and function tools), so the prompt starts with the cache's tokens. A cache the
tenant does not have (never made, expired, deleted, another tenant's) is the same 404.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from kvgate.gateway.edge.body import prepare
from kvgate.gateway.edge.context import principal_of
from kvgate.gateway.http.state import AppState, state_of
from kvgate.gateway.ledger import LedgerUnavailable, NotFound, Principal
from kvgate.gateway.protocol.errors import ApiError, bad_request

ID_PREFIX = "cache_"
CACHE_ID = re.compile(r"cache_[A-Za-z0-9_-]{1,58}")


def not_found(cache_id: str, param: str | None = "cached_content") -> ApiError:
    """``param``: the body field that named it (None: the path did)."""
    shown = cache_id[:80] if cache_id.isprintable() else repr(cache_id[:80])
    return ApiError(404, f"No cache with id '{shown}' (it never existed, expired or was "
                    "deleted).", code="cache_not_found", param=param)


def unavailable() -> ApiError:
    return ApiError(503, "Caches cannot be read now: the database is unavailable. Retry "
                    "shortly.", code="ledger_unavailable", retry_after=5.0)


def tenant_of(request: web.Request) -> Principal:
    p = principal_of(request)
    assert p.tenant_id is not None  # the auth middleware lets only tenant keys through
    return p


async def cache_row(state: AppState, cache_id: str, tenant_id: int,
                    param: str | None = "cached_content") -> dict[str, Any]:
    if not CACHE_ID.fullmatch(cache_id):
        raise not_found(cache_id, param)
    try:
        return await state.ledger.get_cache(cache_id, tenant_id)
    except NotFound:
        raise not_found(cache_id, param) from None
    except LedgerUnavailable:
        raise unavailable() from None


@dataclass(frozen=True)
class Named:
    cache_id: str
    tokens: int


async def named_cache(request: web.Request, raw: bytes, api: str
                      ) -> tuple[bytes | dict[str, Any], Named | None]:
    """``cached_content`` of a chat completions (``api`` "openai") or Messages
    ("anthropic") body: the body, parsed, with the cache's prefix in front of its own
    messages, and the cache; the raw body as it is when it names none."""
    if b"cached_content" not in raw:
        return raw, None
    body = await prepare(raw, lambda b: b)
    if "cached_content" not in body:
        return body, None
    cache_id = body.pop("cached_content")
    if cache_id is None:
        return body, None
    if not isinstance(cache_id, str):
        raise bad_request("'cached_content' must be a cache id (\"cache_…\").",
                          param="cached_content", code="invalid_type")
    p = tenant_of(request)
    assert p.tenant_id is not None
    row = await cache_row(state_of(request), cache_id, p.tenant_id)
    if api == "responses":
        return merged_responses(row["prefix"], body), Named(cache_id, row["tokens"])
    return merged(row["prefix"], body, api), Named(cache_id, row["tokens"])


def merged_responses(stored: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """A Responses API body with the cache's turns first in ``input`` (as message items)
    and its tools as the request's. Nothing may come before them: ``instructions`` and
    ``previous_response_id`` are refused beside ``cached_content`` (400)."""
    for key in ("instructions", "previous_response_id"):
        if body.get(key) not in (None, ""):
            raise bad_request(f"A request that names a cache may not set '{key}': it would "
                              "come before the cache's messages. Put it in the cache, or "
                              "continue from this response's id instead.", param=key,
                              code="invalid_value")
    prefix = stored if stored["api"] == "openai" else _converted(stored, "openai")
    turns = []
    for m in prefix["messages"]:
        text = _text(m.get("content"))
        if text is None or m.get("tool_calls") or m.get("role") == "tool":
            raise bad_request("The cache named holds tool calls or results, which the "
                              "Responses API cannot take as leading input; name it from "
                              "/v1/chat/completions.", param="cached_content",
                              code="invalid_value")
        turns.append({"type": "message", "role": m["role"], "content": text})
    own = body.get("input")
    if isinstance(own, str):
        own = [{"type": "message", "role": "user", "content": own}]
    if not isinstance(own, list):
        raise bad_request("Missing required field 'input'.", param="input",
                          code="missing_field")
    out = {**body, "input": [*turns, *own]}
    tools = [{"type": "function", "name": t["function"]["name"],
              **({"description": t["function"]["description"]}
                 if "description" in t["function"] else {}),
              "parameters": t["function"].get("parameters") or {"type": "object"}}
             for t in prefix.get("tools") or []]
    if tools:
        if body.get("tools") not in (None, []):
            raise bad_request("This request names a cache that sets 'tools'; a request that "
                              "names a cache may not set 'tools' too.", param="tools",
                              code="invalid_value")
        out["tools"] = tools
    return out


def merged(stored: dict[str, Any], body: dict[str, Any], api: str) -> dict[str, Any]:
    """The request's body with the cache's messages first, and its tools and system."""
    prefix = stored if stored["api"] == api else _converted(stored, api)
    out = dict(body)
    for key in ("tools", "system"):
        if prefix.get(key) is not None and body.get(key) not in (None, [], ""):
            raise bad_request(f"This request names a cache that sets '{key}'; a request that "
                              f"names a cache may not set '{key}' too.", param=key,
                              code="invalid_value")
        if prefix.get(key) is not None:
            out[key] = prefix[key]
    if api == "anthropic" and body.get("system") not in (None, [], "") \
            and prefix.get("system") is None:
        raise bad_request("A request that names a cache may not set 'system': it would "
                          "follow the cache's messages. Put it in the cache.", param="system",
                          code="invalid_value")
    own = body.get("messages")
    if not isinstance(own, list):
        raise bad_request("Missing required field 'messages'.", param="messages",
                          code="missing_field")
    out["messages"] = [*prefix["messages"], *own]
    return out


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text"
                                         and isinstance(b.get("text"), str) for b in content):
        return "".join(b["text"] for b in content)
    return None


def _converted(stored: dict[str, Any], api: str) -> dict[str, Any]:
    """A prefix made in the other API's shape, in this one's: text turns and function
    tools convert; tool calls and results do not (400)."""
    refused = bad_request(f"The cache named was made in the {stored['api']} shape with "
                          "turns that do not convert (tool calls or results); name it from "
                          f"/v1/{'messages' if stored['api'] == 'anthropic' else 'chat/completions'}.",
                          param="cached_content", code="invalid_value")
    messages = []
    system: list[str] = []
    if api == "openai":  # from Anthropic
        if stored.get("system") is not None:
            text = _text(stored["system"])
            if text is None:
                raise refused
            messages.append({"role": "system", "content": text})
        for m in stored["messages"]:
            text = _text(m.get("content"))
            if text is None:
                raise refused
            messages.append({"role": m["role"], "content": text})
        tools = [{"type": "function", "function": {
            "name": t["name"], **({"description": t["description"]} if "description" in t
                                  else {}), "parameters": t.get("input_schema", {})}}
            for t in stored.get("tools") or []]
        return {"api": api, "messages": messages, **({"tools": tools} if tools else {})}
    for m in stored["messages"]:  # from OpenAI
        text = _text(m.get("content"))
        if text is None or m.get("tool_calls") or m.get("role") == "tool":
            raise refused
        if m["role"] in ("system", "developer"):
            if messages:
                raise refused
            system.append(text)
        else:
            messages.append({"role": m["role"], "content": text})
    tools = [{"name": t["function"]["name"],
              **({"description": t["function"]["description"]}
                 if "description" in t["function"] else {}),
              "input_schema": t["function"].get("parameters") or {"type": "object"}}
             for t in stored.get("tools") or []]
    out: dict[str, Any] = {"api": api, "messages": messages}
    if system:
        out["system"] = "\n".join(system)
    if tools:
        out["tools"] = tools
    return out


async def pin_named(request: web.Request, named: Named | None, prompt: list[int]) -> None:
    """Pin a named cache's blocks on this replica (the first time it is used here: a
    restart, another replica's cache): the request's prompt starts with the cache's tokens,
    and whatever of them it writes is pinned as it is written."""
    if named is None:
        return
    state = state_of(request)
    if named.cache_id in state.explicit_caches:
        return
    p = tenant_of(request)
    ns = state.quotas.apply(p)
    await state.engine.pin(ns, prompt[:named.tokens], named.cache_id)
    state.explicit_caches[named.cache_id] = ns
