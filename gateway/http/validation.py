"""Small typed readers for request bodies: each says which field was wrong and why."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.http.errors import ApiError, bad_request
from gateway.http.state import AppState

if TYPE_CHECKING:  # the engine pulls in torch; the ledger-only CLI must not
    from gateway.engine.engine import Engine

_MISSING = object()


async def read_json(request: web.Request) -> dict:
    """Any Content-Type is read as JSON: `curl -d` sends a form type and users forget -H."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"The body is not valid JSON: {exc}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object.", code="invalid_json")
    return body


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


def check_model(state: AppState, model: str, param: str = "model") -> None:
    if model != state.engine.model_id:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves "
                       f"'{state.engine.model_id}' (see /v1/models).", param=param,
                       code="model_not_found")


def token_budget(state: AppState, prompt_len: int, requested: int | None, param: str) -> int:
    """Validate max_tokens against the context; the default fills what is left, capped."""
    ctx = int(state.engine.model_info["context_length"])
    if requested is not None and requested < 1:
        raise bad_request(f"'{param}' must be at least 1.", param=param, code="invalid_value")
    if prompt_len < 1:
        raise bad_request("The prompt is empty.", param="messages", code="empty_prompt")
    if prompt_len >= ctx:
        raise bad_request(f"The prompt is {prompt_len} tokens; this model's context is {ctx}.",
                          param="messages", code="context_length_exceeded")
    if requested is None:
        return min(state.settings.default_max_tokens, ctx - prompt_len)
    if prompt_len + requested > ctx:
        raise bad_request(f"'{param}' is {requested} but only {ctx - prompt_len} tokens are left "
                          f"after the {prompt_len}-token prompt (context {ctx}).", param=param,
                          code="context_length_exceeded")
    return requested


def encode(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text)
