"""Small typed readers for request bodies: each says which field was wrong and why."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from kvgate.gateway.http.errors import ApiError, bad_request
from kvgate.gateway.http.models_api import resolve_model, served_names
from kvgate.gateway.http.state import AppState, state_of

if TYPE_CHECKING:  # the engine pulls in torch; the ledger-only CLI must not
    from kvgate.gateway.engine.engine import Engine

_MISSING = object()


T = TypeVar("T")

MAX_JSON_DEPTH = 64  # objects and arrays nested in each other; no API body comes close
OFFLOAD_BYTES = 64 * 1024  # bodies above this are parsed and prepared off the event loop
# JSON's \ud800 escapes (and UTF-8 encoded surrogates, which json.loads lets through)
# give strings no codec can encode; a valid pair is already one character after parsing.
_SURROGATE = re.compile("[\ud800-\udfff]")
# Request preparation (JSON parse, chat template, tokenizing) of big bodies; the tokenizer
# releases the GIL, so the event loop keeps answering meanwhile. Bounded: a flood of big
# prompts queues here, not on the loop.
_PREPARE = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvgate-prepare")


def parse_json(raw: bytes | str) -> dict:
    """The body as a JSON object, or a 400: malformed, not an object, nested deeper than
    ``MAX_JSON_DEPTH``, or holding a lone UTF-16 surrogate (in a key or a value)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise bad_request(f"The body is nested too deeply (at most {MAX_JSON_DEPTH} levels).",
                          code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"The body is not valid JSON: {exc}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object.", code="invalid_json")
    _check_tree(body)
    return body


def _check_tree(root: dict) -> None:
    """Iterative, so depth is checked before Python's own recursion limit is near."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad_request(f"The body is nested too deeply (at most {MAX_JSON_DEPTH} "
                              "levels).", code="invalid_json")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(key, str) and _SURROGATE.search(key):
                _surrogate()
            if isinstance(value, str):
                if _SURROGATE.search(value):
                    _surrogate()
            elif isinstance(value, (dict, list)):
                stack.append((value, depth + 1))


def _surrogate() -> None:
    raise bad_request("The body holds a lone UTF-16 surrogate (e.g. \"\\ud800\"), which is "
                      "not text; send valid Unicode.", code="invalid_json")


async def read_body(request: web.Request) -> bytes:
    """The raw body (within the app's size limit), read only after admission: a 408 when it
    does not arrive within the read timeout (the connection is then closed), a 400 when its
    framing is broken (chunked encoding, a short Content-Length)."""
    timeout = state_of(request).settings.read_timeout_s
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        request.protocol.close()  # what is left of the body is never read: not reusable
        raise ApiError(408, f"The request body did not arrive within {timeout}s.",
                       code="request_timeout") from None
    except HttpProcessingError as exc:
        request.protocol.close()
        raise bad_request(f"The request body is malformed: {exc.message}.",
                          code="bad_http_request") from None


async def prepare(raw: bytes | dict, build: Callable[[dict], T]) -> T:
    """Parse ``raw`` and run ``build`` (validation, chat template, tokenizing) on it: inline
    for small bodies (a thread hop costs more than the work), on a worker thread for big
    ones so the event loop stays free. ``build`` must only read shared state. A body parsed
    already (one that names an explicit cache, its prefix put in) is built on a worker
    thread."""
    loop = asyncio.get_running_loop()
    if isinstance(raw, dict):
        body = raw
        return await loop.run_in_executor(_PREPARE, lambda: build(body))
    if len(raw) <= OFFLOAD_BYTES:
        return build(parse_json(raw))
    return await loop.run_in_executor(_PREPARE, lambda: build(parse_json(raw)))


async def read_json(request: web.Request) -> dict:
    """Any Content-Type is read as JSON: `curl -d` sends a form type and users forget -H."""
    return await prepare(await read_body(request), lambda body: body)


def field(body: dict, name: str, kind: type | tuple[type, ...], *, required: bool = False,
          default: Any = None, allow_none: bool = True) -> Any:
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and allow_none and not required):
        if required:
            raise bad_request(f"Missing required field '{name}'.", param=name,
                              code="missing_field")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise bad_request(f"Field '{name}' must be {names}, got {type(value).__name__}.",
                          param=name, code="invalid_type")
    return value


def number(body: dict[str, Any], name: str, lo: float, hi: float, default: float) -> float:
    value = field(body, name, float, default=default)
    if not lo <= value <= hi:
        raise bad_request(f"Field '{name}' must be between {lo} and {hi}.", param=name,
                          code="invalid_value")
    return float(value)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def integer(body: dict[str, Any], name: str, lo: int, hi: int,
            default: int | None) -> int | None:
    value = field(body, name, int, default=default)
    if value is None:
        return None
    if not lo <= value <= hi:
        raise bad_request(f"Field '{name}' must be between {lo} and {hi}.", param=name,
                          code="invalid_value")
    return int(value)


def stop_list(body: dict, name: str, max_items: int = 4) -> list[str]:
    value = field(body, name, (str, list), default=[])
    if isinstance(value, str):
        value = [value]
    if len(value) > max_items or not all(isinstance(s, str) and s for s in value):
        raise bad_request(f"Field '{name}' must be up to {max_items} non-empty strings.",
                          param=name, code="invalid_value")
    return list(value)


def reject(body: dict, names: dict[str, str]) -> None:
    """Parameters we do not implement that would change the result: say so, do not ignore."""
    for name, why in names.items():
        value = body.get(name)
        if value not in (None, False, [], {}, 0):
            raise bad_request(f"'{name}' is not supported by this server: {why}.", param=name,
                              code="unsupported_parameter")


def check_model(state: AppState, model: str, param: str = "model") -> str:
    """The name to report for ``model`` (an alias gives the first served name), or a 404."""
    reported = resolve_model(state, model)
    if reported is None:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves "
                       f"'{served_names(state)[0]}' (see /v1/models).", param=param,
                       code="model_not_found")
    return reported


def token_budget(state: AppState, prompt_len: int, requested: int | None, param: str,
                 prompt_param: str = "messages") -> int:
    """Validate max_tokens against the context; the default fills what is left, capped.
    ``prompt_param``: the field that holds the prompt, named in its errors."""
    ctx = int(state.engine.model_info["context_length"])
    if requested is not None and requested < 1:
        raise bad_request(f"'{param}' must be at least 1.", param=param, code="invalid_value")
    if prompt_len < 1:
        raise bad_request("The prompt is empty.", param=prompt_param, code="empty_prompt")
    if prompt_len >= ctx:
        raise bad_request(f"The prompt is {prompt_len} tokens; this model's context is {ctx}.",
                          param=prompt_param, code="context_length_exceeded")
    if requested is None:
        return min(state.settings.default_max_tokens, ctx - prompt_len)
    if prompt_len + requested > ctx:
        raise bad_request(f"'{param}' is {requested} but only {ctx - prompt_len} tokens are left "
                          f"after the {prompt_len}-token prompt (context {ctx}).", param=param,
                          code="context_length_exceeded")
    return requested


def encode(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text)
