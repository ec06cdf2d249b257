"""Structured outputs: what a request asks its output to match.

``StructuredSpec(kind, spec)`` crosses from the HTTP side into the engine inside
``SamplingParams.structured``; ``gateway/engine/grammar.py`` compiles it against the
model's tokenizer and enforces it with token masks. The spec is text:

- ``json_schema``: a JSON schema as a JSON string (``json_schema_spec`` builds it);
- ``json_object``: any JSON object (``spec`` is ignored);
- ``regex``: a regular expression the whole output matches;
- ``lark``: a grammar in llguidance's Lark syntax (``%json { schema }`` embeds a schema).

JSON is generated compact (no free whitespace between tokens), so a model cannot spend its
whole budget on blanks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

StructuredKind = Literal["json_object", "json_schema", "regex", "lark"]
KINDS: tuple[str, ...] = ("json_object", "json_schema", "regex", "lark")


@dataclass(frozen=True)
class StructuredSpec:
    kind: StructuredKind
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown structured output kind {self.kind!r}")


JSON_OBJECT = StructuredSpec("json_object", "")


def json_schema_spec(schema: dict[str, Any], strict: bool) -> StructuredSpec:
    """OpenAI's ``response_format`` json_schema as a spec.

    ``strict``: OpenAI's strict mode, where every object lists all its properties as
    required and allows no others: objects that leave ``additionalProperties`` or
    ``required`` out get them filled in that way, and a keyword the grammar engine does not
    implement is an error. Not strict: the schema as sent, keywords the grammar engine does
    not implement ignored (OpenAI's best effort).
    """
    out = _strict(schema) if strict else dict(schema)
    guidance = out.get("x-guidance")
    if not strict and (guidance is None or isinstance(guidance, dict)):
        # (anything else is left as sent: the grammar engine refuses it, a 400)
        out["x-guidance"] = {"lenient": True, **(guidance or {})}
    return StructuredSpec("json_schema", json.dumps(out, sort_keys=True))


_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMAS = ("items", "additionalProperties", "not", "contains", "if", "then", "else",
            "propertyNames", "unevaluatedProperties", "additionalItems")


def _strict(node: Any) -> Any:
    """Strict mode's defaults on every object schema inside ``node``."""
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _strict(v) for name, v in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_strict(v) for v in out[key]]
    for key in _SCHEMAS:
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    types = out.get("type")
    is_object = types == "object" or (isinstance(types, list) and "object" in types)
    if is_object or (types is None and isinstance(out.get("properties"), dict)):
        out.setdefault("additionalProperties", False)
        if isinstance(out.get("properties"), dict):
            out.setdefault("required", list(out["properties"]))
    return out
