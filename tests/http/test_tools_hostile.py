"""Hostile shapes of tools and formats together: every one is a 4xx in the API's shape or
an answer, never a 500, and refused before any grammar work a tenant could make costly."""

from __future__ import annotations

import json
from typing import Any

import pytest

from testkit import Session, Tenant, ThreadServer

ASK = [{"role": "user", "content": "Weather in Oslo?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _post(server: ThreadServer, tenant: Tenant, model_id: str, path: str = "/v1/chat/completions",
          **body: Any) -> Any:
    http = Session(server.url)
    try:
        if path == "/v1/messages":
            return http.post(path, headers={"x-api-key": tenant.key},
                             json={"model": model_id, "max_tokens": 8, **body})
        return http.post(path, headers=tenant.headers,
                         json={"model": model_id, "max_tokens": 8, **body})
    finally:
        http.close()


@pytest.mark.parametrize("body", [
    {"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "x-guidance": "foo"}}}},
    {"messages": ASK, "guided_json": {"type": "object", "x-guidance": 5}},
    {"messages": ASK, "tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "x-guidance": "foo"}}}]},
])
def test_an_x_guidance_that_is_not_an_object_is_a_400(server, tenant, model_id, body):
    resp = _post(server, tenant, model_id, **body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["message"]


@pytest.mark.parametrize("choice", ["required", "auto"])
def test_too_many_regular_expressions_are_refused_before_compiling(server, tenant, model_id,
                                                                   choice):
    schema = {"type": "object", "patternProperties": {
        f"^a{i}[a-z]+x$": {"type": "string"} for i in range(40)}}
    body: dict[str, Any] = {"messages": ASK, "tools": [WEATHER], "tool_choice": choice,
                            "response_format": {"type": "json_schema",
                                                "json_schema": {"name": "x", "schema": schema}}}
    if choice == "required":  # the same schema as a tool's parameters
        body = {"messages": ASK, "tool_choice": "required", "tools": [{"type": "function",
                "function": {"name": "f", "parameters": schema}}]}
    resp = _post(server, tenant, model_id, **body)
    assert resp.status_code == 400, resp.text
    assert "regular expressions" in resp.json()["error"]["message"]


@pytest.mark.parametrize("guided", [{"guided_regex": "[a-z]{1,5}"},
                                    {"guided_choice": ["yes", "no"]}])
def test_tools_under_auto_with_a_non_json_format_keep_the_format(server, tenant, model_id,
                                                                 guided):
    resp = _post(server, tenant, model_id, messages=ASK, tools=[WEATHER], tool_choice="auto",
                 **guided)
    assert resp.status_code == 200, resp.text


def test_a_tool_declared_as_a_bare_object_is_called_without_arguments(server, tenant,
                                                                       model_id):
    """``{"type": "object"}`` is how a tool without arguments is often declared: forced,
    its call is ``{}`` instead of keys written until max_tokens."""
    resp = _post(server, tenant, model_id, messages=ASK, max_tokens=64,
                 tools=[{"type": "function", "function": {"name": "now",
                                                          "parameters": {"type": "object"}}}],
                 tool_choice={"type": "function", "function": {"name": "now"}})
    assert resp.status_code == 200, resp.text
    (call,) = resp.json()["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {}
