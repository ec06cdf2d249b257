"""What a request asks of the prompt cache: how long what it writes is kept, and its key.

- Retention. OpenAI's ``prompt_cache_retention``: ``in_memory`` (the tenant's default TTL)
  or ``24h``; ``prompt_cache_options.ttl``: ``30m``. Anthropic's ``cache_control.ttl``
  (``5m``/``1h``, per breakpoint; ``protocol.anthropic``). Each write is billed by its
  retention class (``kvgate.gateway.usage.ttl_class``: 5m, 1h, 24h), priced by the plan.
  A retention longer than the tenant's ``cache_max_ttl_seconds`` is a 400, as is any value
  not listed here: a request never silently gets less than it asked for.
- Key. OpenAI's ``prompt_cache_key`` (at most 64 characters), Anthropic's
  ``metadata.user_id``: kept with the request's usage row and used by ``kvgate route`` as
  the affinity key of requests whose prompt blocks no replica holds yet. It never widens
  what a request may hit: every lookup stays within the tenant's own namespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvgate.gateway.ledger.billing import CACHE_KEY_MAX, printable_key
from kvgate.gateway.protocol.errors import bad_request
from kvgate.gateway.usage import ONE_DAY_S

RETENTION = {"in_memory": None, "24h": float(ONE_DAY_S)}  # None: the tenant's default TTL
OPTIONS_TTL = {"30m": 1800.0}
OPENAI_KEY_MAX = 64  # the OpenAI spec's maxLength of prompt_cache_key


@dataclass(frozen=True)
class CacheRequest:
    ttl_s: float | None = None  # None: the tenant's default TTL
    key: str | None = None
    asked: str = ""  # how the request asked for ttl_s, for the error that refuses it


NO_CACHE_REQUEST = CacheRequest()


def openai_cache_request(body: dict[str, Any]) -> CacheRequest:
    """``prompt_cache_retention``, ``prompt_cache_options`` and ``prompt_cache_key``."""
    ttl_s: float | None = None
    asked = ""
    retention = body.get("prompt_cache_retention")
    if retention is not None:
        if not isinstance(retention, str) or retention not in RETENTION:
            raise bad_request("'prompt_cache_retention' must be \"in_memory\" or \"24h\" (or "
                              f"null), got {str(retention)[:40]!r}.",
                              param="prompt_cache_retention", code="invalid_value")
        ttl_s, asked = RETENTION[retention], f"prompt_cache_retention {retention!r}"
    options = body.get("prompt_cache_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"ttl", "mode"}:
            raise bad_request("'prompt_cache_options' must be an object with 'ttl' (\"30m\") "
                              "and 'mode' (\"implicit\").", param="prompt_cache_options")
        mode = options.get("mode", "implicit")
        if mode != "implicit":
            raise bad_request("'prompt_cache_options.mode' must be \"implicit\": every prompt "
                              "prefix is cached here, there are no explicit breakpoints.",
                              param="prompt_cache_options.mode", code="invalid_value")
        ttl = options.get("ttl", "30m")
        if not isinstance(ttl, str) or ttl not in OPTIONS_TTL:
            raise bad_request("'prompt_cache_options.ttl' must be \"30m\".",
                              param="prompt_cache_options.ttl", code="invalid_value")
        if ttl_s is None or OPTIONS_TTL[ttl] > ttl_s:  # a minimum lifetime: the longer wins
            ttl_s, asked = OPTIONS_TTL[ttl], f"prompt_cache_options.ttl {ttl!r}"
    key = body.get("prompt_cache_key")
    if key is not None and (not isinstance(key, str) or not key
                            or len(key) > OPENAI_KEY_MAX or not printable_key(key)):
        raise bad_request(f"'prompt_cache_key' must be a string of 1 to {OPENAI_KEY_MAX} "
                          "printable characters (or null).", param="prompt_cache_key")
    return CacheRequest(ttl_s, key, asked)


def anthropic_cache_request(body: dict[str, Any]) -> CacheRequest:
    """``metadata.user_id`` as the cache key (TTLs are per breakpoint, ``ttl_segments``)."""
    metadata = body.get("metadata")
    if metadata is None:
        return NO_CACHE_REQUEST
    if not isinstance(metadata, dict) or set(metadata) - {"user_id"}:
        raise bad_request("'metadata' may only hold 'user_id'.")
    user = metadata.get("user_id")
    if user is None:
        return NO_CACHE_REQUEST
    if not isinstance(user, str) or len(user) > CACHE_KEY_MAX or not printable_key(user):
        raise bad_request(f"'metadata.user_id' must be a string of at most {CACHE_KEY_MAX} "
                          "printable characters.")
    return CacheRequest(key=user or None)


def check_retention(cache: CacheRequest, segments: list[tuple[int, float]],
                    max_ttl_s: int) -> None:
    """400 when the request asks to keep what it writes longer than the tenant may."""
    longest = max((ttl for _, ttl in segments), default=0.0)
    if longest > max_ttl_s:
        raise bad_request(f"A cache_control ttl of {_span(longest)} is longer than this "
                          f"tenant may ask for ({_span(max_ttl_s)}).")
    if cache.ttl_s is not None and cache.ttl_s > max_ttl_s:
        raise bad_request(f"{cache.asked} keeps cached prefixes for {_span(cache.ttl_s)}; "
                          f"this tenant may ask for at most {_span(max_ttl_s)}.",
                          param=cache.asked.split(" ")[0], code="invalid_value")


def _span(seconds: float) -> str:
    s = int(seconds)
    if s % 3600 == 0 and s:
        return f"{s // 3600} h"
    if s % 60 == 0 and s:
        return f"{s // 60} min"
    return f"{s} s"
