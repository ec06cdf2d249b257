"""Structured outputs over HTTP: ``response_format`` (json_object, json_schema), the SDK's
``chat.completions.parse`` with a pydantic model, vLLM's ``guided_*`` fields, invalid specs
refused with a 400 naming the field, and the tokens billed like any others."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest

from testkit import Session, Tenant, ThreadServer, shapes

pytestmark = pytest.mark.both_engines  # against both engine layouts (conftest.py)


class Pet(pydantic.BaseModel):
    kind: Literal["cat", "dog", "fish"]
    legs: int = pydantic.Field(ge=0, le=8)
    name: str = pydantic.Field(max_length=6)
    vaccinated: bool


def client(server: ThreadServer, tenant: Tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=tenant.key, max_retries=0)


MESSAGES = [{"role": "user", "content": "Describe a pet as JSON."}]


def test_sdk_parse_with_pydantic_model(server: ThreadServer, tenant: Tenant,
                                       model_id: str) -> None:
    c = client(server, tenant).chat.completions.parse(
        model=model_id, messages=MESSAGES,  # type: ignore[arg-type]
        response_format=Pet, max_completion_tokens=200, temperature=0)
    choice = c.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Pet)
    assert c.usage is not None and c.usage.completion_tokens >= len("{}")


def test_json_object_and_schema_shapes_and_billing(server: ThreadServer, tenant: Tenant,
                                                   http: Session, model_id: str) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1,
                                                     "maximum": 99},
                                               "ok": {"type": "boolean"}}}
    bodies = [
        {"response_format": {"type": "json_schema",
                             "json_schema": {"name": "x", "schema": schema, "strict": True}}},
        {"response_format": {"type": "text"}},
    ]
    headers = {"Authorization": f"Bearer {tenant.key}"}
    for extra in bodies:
        raw = http.post("/v1/chat/completions", headers=headers, json={
            "model": model_id, "messages": MESSAGES, "max_tokens": 100, "temperature": 0,
            **extra})
        assert raw.status_code == 200, raw.text
        shapes.check_openai("ChatCompletion", raw.json())
    out = raw.json()
    rows = server.ledger_rows(tenant.id)
    billed = rows["req_" + out["id"].removeprefix("chatcmpl-")]
    assert billed["n"] == 1
    assert billed["completion_tokens"] == out["usage"]["completion_tokens"]
    # the strict schema's output
    first = http.post("/v1/chat/completions", headers=headers, json={
        "model": model_id, "messages": MESSAGES, "max_tokens": 100, "temperature": 0,
        **bodies[0]}).json()
    value = json.loads(first["choices"][0]["message"]["content"])
    jsonschema.validate(value, {**schema, "required": ["n", "ok"],
                                "additionalProperties": False})
    assert first["choices"][0]["finish_reason"] == "stop"


def test_guided_fields(server: ThreadServer, tenant: Tenant, http: Session,
                       model_id: str) -> None:
    headers = {"Authorization": f"Bearer {tenant.key}"}
    base = {"model": model_id, "max_tokens": 60, "temperature": 0}
    cases = [
        ({"guided_choice": ["alpha", "beta"]}, lambda t: t in ("alpha", "beta")),
        ({"guided_regex": "[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch("[0-9]{3}-[a-z]{2}", t)),
        ({"guided_json": {"type": "object", "properties": {"b": {"type": "boolean"}},
                          "required": ["b"], "additionalProperties": False}},
         lambda t: isinstance(json.loads(t)["b"], bool)),
        ({"guided_grammar": 'root ::= "yes" | "no"'}, lambda t: t in ("yes", "no")),
    ]
    for extra, ok in cases:
        for path, body in (("/v1/chat/completions", {"messages": MESSAGES}),
                           ("/v1/completions", {"prompt": "answer:"})):
            raw = http.post(path, headers=headers, json={**base, **body, **extra})
            assert raw.status_code == 200, (extra, raw.text)
            choice = raw.json()["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            assert ok(text), (extra, text)
            assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize(("extra", "param"), [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                  "schema": "nope"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_grammar": "start: nowhere"}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
])
def test_invalid_specs_are_400(server: ThreadServer, tenant: Tenant, http: Session,
                               model_id: str, extra: dict, param: str) -> None:
    raw = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {tenant.key}"},
                    json={"model": model_id, "messages": MESSAGES, "max_tokens": 8, **extra})
    assert raw.status_code == 400, raw.text
    assert raw.json()["error"]["param"] == param
    with pytest.raises(openai.BadRequestError):
        client(server, tenant).chat.completions.create(
            model=model_id, messages=MESSAGES, max_tokens=8,  # type: ignore[arg-type]
            extra_body=extra)


def test_streamed_json_object(server: ThreadServer, tenant: Tenant, model_id: str) -> None:
    stream = client(server, tenant).chat.completions.create(
        model=model_id, messages=MESSAGES, max_tokens=400, temperature=0,  # type: ignore[arg-type]
        response_format={"type": "json_object"}, stream=True)
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    if finish == "stop":  # a random-weight model may fill a free string to the budget
        assert isinstance(json.loads(text), dict)
    else:
        assert finish == "length" and text.startswith("{")


@pytest.mark.parametrize("spelling", ["output_format", "output_config"])
def test_anthropic_output_format_follows_the_schema(server: ThreadServer, tenant: Tenant,
                                                    model_id: str, spelling: str) -> None:
    """Anthropic's structured outputs (the beta's ``output_format`` and the later
    ``output_config.format``): the text answer validates against the schema."""
    import anthropic

    schema = Pet.model_json_schema()
    fmt = {"type": "json_schema", "schema": schema}
    extra = {"output_format": fmt} if spelling == "output_format" else \
        {"output_config": {"format": fmt}}
    c = anthropic.Anthropic(base_url=server.url, api_key=tenant.key, max_retries=0)
    msg = c.messages.create(model=model_id, max_tokens=200,
                            messages=[{"role": "user", "content": "A pet, as JSON."}],
                            extra_body={**extra, "temperature": 0})
    assert msg.stop_reason == "end_turn"
    text = "".join(b.text for b in msg.content if b.type == "text")
    jsonschema.validate(json.loads(text), schema)
    bad = c.messages.with_raw_response.create  # a bad spec is a 400 in Anthropic's shape
    with pytest.raises(anthropic.BadRequestError):
        bad(model=model_id, max_tokens=8, messages=[{"role": "user", "content": "x"}],
            extra_body={"output_format": {"type": "yaml"}})


@pytest.mark.parametrize("extra", [
    {"guided_grammar": 'start: a\na: "x" a'},  # never ends: given up on midway
    {"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {
        "$ref": "#/$defs/a", "$defs": {"a": {"type": "object", "required": ["x"],
                                              "properties": {"x": {"$ref": "#/$defs/a"}},
                                              "additionalProperties": False}}}}}},
    {"guided_json": "[" * 5000 + "]" * 5000},  # nested past Python's recursion limit
    {"guided_choice": [f"choice {i}" for i in range(8000)]},  # past the size bound
])
def test_hostile_grammars_are_4xx_and_the_server_lives(server: ThreadServer, tenant: Tenant,
                                                      http: Session, model_id: str,
                                                      extra: dict) -> None:
    headers = {"Authorization": f"Bearer {tenant.key}"}
    r = http.post("/v1/chat/completions", headers=headers,
                  json={"model": model_id, "messages": MESSAGES, "max_tokens": 3000, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    ok = http.post("/v1/chat/completions", headers=headers,
                   json={"model": model_id, "messages": MESSAGES, "max_tokens": 2})
    assert ok.status_code == 200


def test_tool_arguments_nested_too_deep_are_400(server: ThreadServer, tenant: Tenant,
                                                http: Session, model_id: str) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]
    r = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {tenant.key}"},
                  json={"model": model_id, "messages": messages, "max_tokens": 2})
    assert r.status_code == 400, r.text
