"""Small typed readers for request bodies: each says which field was wrong and why."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from kvgate.gateway.protocol.errors import bad_request

_MISSING = object()


T = TypeVar("T")

MAX_JSON_DEPTH = 64  # objects and arrays nested in each other; no API body comes close
# JSON's \ud800 escapes (and UTF-8 encoded surrogates, which json.loads lets through)
# give strings no codec can encode; a valid pair is already one character after parsing.
_SURROGATE = re.compile("[\ud800-\udfff]")


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


