"""What a client sends and reads back: one request read to its end, and the usage it was
shown in the ledger's terms."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai

from testkit.admin import Tenant
from testkit.bodies import request_body
from testkit.sse import aiter_sse


def billed_usage(kind: str, usage: Mapping[str, Any]) -> dict[str, int]:
    """Either API's usage as the ledger counts it: ``prompt_tokens`` is every input token,
    ``cached_tokens`` those read from the cache. ``kind`` starts with ``messages`` for the
    Anthropic API, whose ``input_tokens`` leaves out cache reads and writes."""
    if kind.startswith("messages"):
        cached = usage["cache_read_input_tokens"]
        write = usage["cache_creation_input_tokens"]
        return {"prompt_tokens": usage["input_tokens"] + cached + write,
                "cached_tokens": cached, "completion_tokens": usage["output_tokens"]}
    return {"prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
            "completion_tokens": usage["completion_tokens"]}


def final_usage(payload: Any) -> Mapping[str, Any] | None:
    """The billed usage a stream event carries, if it is the one that does: OpenAI's last
    chunk or Anthropic's ``message_delta`` (``message_start`` has an early copy)."""
    if isinstance(payload, dict) and payload.get("usage") and (
            payload.get("type") in (None, "message_delta")):
        usage: Mapping[str, Any] = payload["usage"]
        return usage
    return None


@dataclass
class Outcome:
    """What a client saw: status, whether the body arrived in full, and the usage in it."""

    kind: str
    status: int
    request_id: str | None = None
    complete: bool = False
    usage: dict[str, int] | None = None
    retry_after: str | None = None
    text: str = ""


async def send(session: aiohttp.ClientSession, url: str, tenant: Tenant, kind: str,
               text: str, max_tokens: int, **extra: Any) -> Outcome:
    """One request (see ``request_body``), read to the end; ``complete`` only when the
    final marker arrived. A connection that dies mid-stream is an incomplete outcome; one
    that fails before the response headers raises."""
    path, body = request_body(kind, text, max_tokens, **extra)
    async with session.post(url + path, json=body, headers=tenant.headers) as resp:
        out = Outcome(kind, resp.status, resp.headers.get("x-request-id"),
                      retry_after=resp.headers.get("Retry-After"))
        if resp.status != 200:
            out.text = await resp.text()
            return out
        if not body.get("stream"):
            data = await resp.json()
            out.usage = billed_usage(kind, data["usage"])
            out.complete = True
            return out
        try:
            async for event in aiter_sse(resp):
                payload = event.payload
                if event.done or (isinstance(payload, dict)
                                  and payload.get("type") == "message_stop"):
                    out.complete = True
                elif (usage := final_usage(payload)) is not None:
                    out.usage = billed_usage(kind, usage)
        except aiohttp.ClientError:
            pass  # the connection died; ``complete`` says whether the end marker came first
        return out


def ask(url: str, tenant: Tenant, system: str, question: str, max_tokens: int = 4) -> Any:
    """One chat completion through the OpenAI SDK: ``system`` then ``question``, greedy."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=tenant.key, max_retries=0)
    return client.chat.completions.create(
        model="demo", max_tokens=max_tokens, temperature=0,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])


def cached_tokens(response: Any) -> int:
    """The prompt tokens an SDK response says were read from the cache."""
    return int(response.usage.prompt_tokens_details.cached_tokens or 0)
