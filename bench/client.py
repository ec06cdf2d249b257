"""What a client of kvgate reads back, shared by ``bench/load.py`` and ``tests/harness``:
server-sent events, and either API's usage in the ledger's terms."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any


async def sse_events(resp: Any) -> AsyncIterator[Any]:
    """``data:`` payloads of an aiohttp SSE response, JSON-decoded where they are JSON."""
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        while b"\n\n" in buf:
            raw, buf = buf.split(b"\n\n", 1)
            for line in raw.decode().splitlines():
                if line.startswith("data:"):
                    payload = line[5:].strip()
                    yield payload if payload == "[DONE]" else json.loads(payload)


def billed_usage(kind: str, usage: dict[str, Any]) -> dict[str, int]:
    """The client's usage in ledger terms (prompt = every input token); ``kind`` starts
    with ``messages`` for the Anthropic API."""
    if kind.startswith("messages"):
        cached = usage["cache_read_input_tokens"]
        write = usage["cache_creation_input_tokens"]
        return {"prompt_tokens": usage["input_tokens"] + cached + write,
                "cached_tokens": cached, "completion_tokens": usage["output_tokens"]}
    return {"prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
            "completion_tokens": usage["completion_tokens"]}
