"""OpenAI's published OpenAPI document as JSON Schema validators for our responses.

Loaded once per session (3 MB of YAML). OpenAPI 3.0's ``nullable: true`` is rewritten as
``anyOf [..., null]`` so a 2020-12 validator reads it as the document means it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).parents[3] / "shared" / "reference" / "openai-openapi.yaml"
_BASE = "urn:openai-openapi"


def _nullable(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _nullable(v) for k, v in node.items()}
        if node.pop("nullable", False) is True:
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


@functools.cache
def _registry() -> Registry:
    with SPEC_PATH.open("rb") as f:
        spec = yaml.load(f, Loader=yaml.CSafeLoader)
    spec = _nullable(spec)
    resource = Resource.from_contents(spec, default_specification=DRAFT202012)
    return Registry().with_resource(_BASE, resource)


@functools.cache
def validator(schema_name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        {"$ref": f"{_BASE}#/components/schemas/{schema_name}"}, registry=_registry())


def validate(schema_name: str, instance: Any) -> None:
    """Raises with every violation listed, not just the first."""
    errors = sorted(validator(schema_name).iter_errors(instance), key=lambda e: list(e.path))
    if errors:
        lines = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:10]]
        raise AssertionError(f"{schema_name} violations:\n" + "\n".join(lines))


def available() -> bool:
    return SPEC_PATH.exists()
