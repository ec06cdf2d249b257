"""Structured outputs on the OpenAI routes: ``response_format`` and vLLM's ``guided_*``.

- ``response_format``: ``{"type": "text"}`` (the default), ``{"type": "json_object"}``
  (any JSON object) or ``{"type": "json_schema", "json_schema": {"name", "schema",
  "strict"}}`` (chat completions; ``client.chat.completions.parse`` sends this);
- vLLM's extra fields, on chat and text completions: ``guided_json`` (a schema, object or
  JSON text), ``guided_regex``, ``guided_choice`` (a list of strings), ``guided_grammar``
  (a Lark grammar, or GBNF / EBNF, which is converted to Lark).

At most one of them per request. The spec is compiled here (cached by the engine), so a
schema or grammar that does not compile is a 400 naming its field before anything runs.
"""

from __future__ import annotations

import json
from typing import Any

from kvgate.gateway.engine import InvalidGrammar, StructuredSpec, json_schema_spec
from kvgate.gateway.engine.structured import JSON_OBJECT
from kvgate.gateway.protocol.errors import bad_request
from kvgate.gateway.protocol.render import GrammarCompiler

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def structured_output(grammars: GrammarCompiler, body: dict[str, Any],
                      chat: bool) -> StructuredSpec | None:
    """The request's structured-output spec (None: free text), compiled; else a 400."""
    found: list[tuple[str, StructuredSpec]] = []
    fmt = body.get("response_format")
    if chat and fmt is not None:
        spec = _response_format(fmt)
        if spec is not None:
            found.append(("response_format", spec))
    elif fmt is not None and not chat:
        raise bad_request("'response_format' is for chat completions; use 'guided_json' or "
                          "'guided_regex' here.", param="response_format",
                          code="unsupported_parameter")
    for name in GUIDED:
        value = body.get(name)
        if value is not None:
            found.append((name, _guided(name, value)))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(f"'{n}'" for n, _ in found)
        raise bad_request(f"Only one structured output may be asked for; got {names}.",
                          param=found[1][0], code="invalid_value")
    param, spec = found[0]
    try:
        grammars.compile(spec)
    except InvalidGrammar as exc:
        raise bad_request(f"'{param}' is not valid: {exc}.", param=param,
                          code="invalid_value") from None
    return spec


def _response_format(fmt: Any) -> StructuredSpec | None:
    if not isinstance(fmt, dict):
        raise bad_request("'response_format' must be an object.", param="response_format",
                          code="invalid_type")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT
    if kind == "json_schema":
        js = fmt.get("json_schema")
        param = "response_format.json_schema"
        if not isinstance(js, dict):
            raise bad_request(f"'{param}' must be an object with 'name' and 'schema'.",
                              param=param, code="invalid_type")
        name = js.get("name")
        if name is not None and not isinstance(name, str):
            raise bad_request(f"'{param}.name' must be a string.", param=f"{param}.name",
                              code="invalid_type")
        schema = js.get("schema", {})
        if not isinstance(schema, dict):
            raise bad_request(f"'{param}.schema' must be a JSON schema object.",
                              param=f"{param}.schema", code="invalid_type")
        strict = js.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise bad_request(f"'{param}.strict' must be a boolean.", param=f"{param}.strict",
                              code="invalid_type")
        return json_schema_spec(schema, bool(strict))
    raise bad_request("'response_format.type' must be 'text', 'json_object' or "
                      f"'json_schema' (got {kind!r}).", param="response_format.type",
                      code="invalid_value")


def _guided(name: str, value: Any) -> StructuredSpec:
    if name == "guided_json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                value = None
        if not isinstance(value, dict):
            raise bad_request("'guided_json' must be a JSON schema (an object, or its JSON "
                              "text).", param=name, code="invalid_type")
        return json_schema_spec(value, strict=False)
    if name == "guided_regex":
        if not isinstance(value, str) or not value:
            raise bad_request("'guided_regex' must be a non-empty string.", param=name,
                              code="invalid_type")
        return StructuredSpec("regex", value)
    if name == "guided_choice":
        if not isinstance(value, list) or not value or not all(
                isinstance(v, str) and v for v in value):
            raise bad_request("'guided_choice' must be a list of non-empty strings.",
                              param=name, code="invalid_type")
        return StructuredSpec("lark", "start: " + " | ".join(json.dumps(v, ensure_ascii=False) for v in value))
    if not isinstance(value, str) or not value.strip():
        raise bad_request("'guided_grammar' must be a grammar (Lark or GBNF text).",
                          param=name, code="invalid_type")
    return StructuredSpec("lark", _to_lark(value))


def _to_lark(grammar: str) -> str:
    """GBNF / EBNF (``::=`` rules, llama.cpp's and xgrammar's syntax) to Lark; Lark as is."""
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return str(any_to_lark(grammar))
    except Exception as exc:
        raise bad_request(f"'guided_grammar' is not valid: {exc}.", param="guided_grammar",
                          code="invalid_value") from None
