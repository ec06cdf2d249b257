"""Response shapes, checked against what clients actually parse them with.

Always: the official SDKs' own typed models (``openai.types``, ``anthropic.types``),
validated the way pydantic validates JSON off the wire in strict mode: a missing required
field, a JSON type that is not the declared one (``"5"`` or ``5.0`` for an integer) or a
value outside a ``Literal`` fails. The SDK clients themselves build these models with
``construct``, which checks nothing, and the models allow unknown fields (``extra="allow"``),
so a misspelled optional field would reach a user as a silent ``None``: unknown fields fail
here too, except the few kvgate adds on purpose (``EXTRA_FIELDS``).

Always, too: OpenAI's published OpenAPI document (``testkit/reference/``, MIT, with
its licence), as JSON Schema. The document is 3 MB of YAML, loaded
once; OpenAPI 3.0's ``nullable: true`` is rewritten as ``anyOf [..., null]`` so a 2020-12
validator reads it as the document means it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic.types
import jsonschema
import openai.types
import openai.types.chat
import pydantic
import yaml
from openai.pagination import SyncPage
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parent / "reference" / "openai-openapi.yaml"
_BASE = "urn:openai-openapi"

# name → (the SDK's type, the schema in OpenAI's document)
OPENAI: dict[str, tuple[Any, str]] = {
    "ChatCompletion": (openai.types.chat.ChatCompletion, "CreateChatCompletionResponse"),
    "ChatCompletionChunk": (openai.types.chat.ChatCompletionChunk,
                            "CreateChatCompletionStreamResponse"),
    "Completion": (openai.types.Completion, "CreateCompletionResponse"),
    # a streamed completion: see ``_completion_chunk``
    "CompletionChunk": (openai.types.Completion, "CreateCompletionResponse"),
    "Model": (openai.types.Model, "Model"),
    "ModelList": (SyncPage[openai.types.Model], "ListModelsResponse"),
}
ANTHROPIC: dict[str, Any] = {
    "Message": anthropic.types.Message,
    "RawMessageStreamEvent": anthropic.types.RawMessageStreamEvent,
}
# Fields kvgate sends that the SDK models do not define, as paths with ``[]`` for a list.
EXTRA_FIELDS = {
    # the billing receipt of a whole answer (also in the kvgate-receipt-id header)
    "ChatCompletion": {"receipt_id"},
    "Completion": {"receipt_id"},
    "Message": {"receipt_id"},
    # what the served model is (the demo model says its text is noise); its context (vLLM)
    "Model": {"note", "max_model_len"},
    "ModelList": {"data[].note", "data[].max_model_len"},
    # message_delta repeats message_start's full usage; the SDK's MessageDeltaUsage has
    # no field for the cache-write split or the tier (they are read from message_start)
    "RawMessageStreamEvent": {"usage.cache_creation", "usage.service_tier"},
    # response.function_call_arguments.done names the function (OpenAI's document requires
    # it; the SDK's event model has no field for it)
    "ResponseStreamEvent": {"name"},
}


def check_openai(name: str, body: Any) -> None:
    """``body`` (decoded JSON) as the openai SDK's ``name`` model, and as the matching
    schema of OpenAI's document when it is present. Raises AssertionError naming every
    problem."""
    model, schema = OPENAI[name]
    if name == "CompletionChunk":
        body = _completion_chunk(body)
    _check_sdk(name, model, body)
    if spec_available():
        _check_spec(schema, body)


def check_anthropic(name: str, body: Any) -> None:
    """``body`` as the anthropic SDK's ``name`` model (``RawMessageStreamEvent`` for one
    event of a stream; ``ping`` is not one, the SDK skips it)."""
    _check_sdk(name, ANTHROPIC[name], body)


def spec_available() -> bool:
    return SPEC_PATH.exists()


# -- the SDK models --------------------------------------------------------------------------


@functools.cache
def _adapter(model: Any) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(model)


def _check_sdk(name: str, model: Any, body: Any) -> None:
    # Validated as JSON, not as Python objects: strict Python mode would refuse an ISO
    # string for a datetime field, strict JSON mode takes it as JSON carries it.
    try:
        value = _adapter(model).validate_json(json.dumps(body), strict=True)
    except pydantic.ValidationError as exc:
        raise AssertionError(f"{name}: the SDK's model rejects it:\n{exc}") from None
    unknown = sorted(set(_extra_fields(value, "")) - EXTRA_FIELDS.get(name, set()))
    if unknown:
        raise AssertionError(f"{name}: fields the SDK's model does not define (a typo "
                             f"reaches users as a silent None): {unknown}")


def _extra_fields(value: Any, path: str) -> Iterator[str]:
    if isinstance(value, pydantic.BaseModel):
        for key in value.model_extra or {}:
            yield f"{path}{key}"
        for key in type(value).model_fields:
            yield from _extra_fields(getattr(value, key), f"{path}{key}.")
    elif isinstance(value, list):
        for item in value:
            yield from _extra_fields(item, path.removesuffix(".") + "[].")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _extra_fields(item, f"{path}{key}.")


def _completion_chunk(chunk: Any) -> Any:
    """Neither the document nor the SDK has a streaming variant of completions: both reuse
    the final shape, whose ``finish_reason`` and ``usage`` are not nullable. Intermediate
    chunks carry null there (as OpenAI's do), so fill those in before checking the rest."""
    if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
        return chunk
    out = {k: v for k, v in chunk.items() if not (k == "usage" and v is None)}
    out["choices"] = [{**c, "finish_reason": c.get("finish_reason") or "length"}
                      if isinstance(c, dict) else c for c in chunk["choices"]]
    return out


# -- OpenAI's document -----------------------------------------------------------------------


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
def _registry() -> Registry[Any]:
    with SPEC_PATH.open("rb") as f:
        spec = yaml.load(f, Loader=yaml.CSafeLoader)
    resource = Resource.from_contents(_nullable(spec), default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(_BASE, resource)
    return registry


@functools.cache
def _validator(schema: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        {"$ref": f"{_BASE}#/components/schemas/{schema}"}, registry=_registry())


def _check_spec(schema: str, body: Any) -> None:
    errors = sorted(_validator(schema).iter_errors(body), key=lambda e: list(e.path))
    if errors:
        lines = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:10]]
        raise AssertionError(f"{schema} violations (OpenAI's document):\n" + "\n".join(lines))
