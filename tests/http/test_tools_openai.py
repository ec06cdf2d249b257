"""OpenAI function tools against the real server, with the official SDK.

The demo model's weights are random, so what it writes is driven two ways: a *scripted
model* (``ScriptedModel``: the demo model's forward, each sampled row of one tenant's
requests pushed to the next token of a script, so the text goes through sampling, grammar
masks, detokenizing and the parser as any output does) and forced calls (``tool_choice``
required or named: constrained decoding makes even random weights write a valid call)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel

from kvgate.gateway.protocol.tool_parsers import HermesParser
from testkit import Session, Tenant, ThreadServer, shapes
from testkit.scripted import ScriptedModel
from testkit.sse import iter_sse

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "metric": {"type": "boolean"}}, "required": ["city", "metric"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture()
def scripted(server: ThreadServer) -> Iterator[ScriptedModel]:
    with ScriptedModel(server.state.engine) as model:
        yield model


def client(server: ThreadServer, tenant: Tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=tenant.key, max_retries=0)


def call_text(name: str, args: dict[str, Any]) -> str:
    return HermesParser().emit(name, args)


def streamed(server: ThreadServer, tenant: Tenant, body: dict[str, Any]) -> dict[str, Any]:
    """A streamed chat, every chunk checked against the SDK's and OpenAI's schema, the
    deltas put together as a client does: content, and tool calls by index."""
    http = Session(server.url)
    try:
        resp = http.post("/v1/chat/completions", json={**body, "stream": True},
                         headers=tenant.headers, stream=True)
        assert resp.status_code == 200, resp.text
        content, calls, finish, heads = "", {}, None, []
        for ev in iter_sse(resp):
            if ev.done:
                break
            chunk = ev.json()
            shapes.check_openai("ChatCompletionChunk", chunk)
            for choice in chunk["choices"]:
                delta = choice["delta"]
                content += delta.get("content") or ""
                for tc in delta.get("tool_calls") or []:
                    if "id" in tc:  # the first delta of a call: index, id, type, name, ""
                        heads.append(tc)
                        assert tc["type"] == "function" and tc["function"]["arguments"] == ""
                        calls[tc["index"]] = {"id": tc["id"], "name": tc["function"]["name"],
                                              "arguments": ""}
                    else:
                        calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
                finish = choice["finish_reason"] or finish
        return {"content": content, "calls": [calls[i] for i in sorted(calls)],
                "finish": finish}
    finally:
        http.close()


def plain(msg: Any) -> list[dict[str, str]]:
    return [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in msg.tool_calls or []]


def test_scripted_call_non_streamed(server: ThreadServer, tenant: Tenant,
                                    scripted: ScriptedModel, model_id: str) -> None:
    scripted.script(tenant, call_text("get_weather", {"city": "Paris", "metric": True}))
    http = Session(server.url)
    raw = http.post("/v1/chat/completions", headers=tenant.headers, json={
        "model": model_id, "messages": ASK, "tools": TOOLS, "max_tokens": 200})
    http.close()
    assert raw.status_code == 200, raw.text
    shapes.check_openai("ChatCompletion", raw.json())
    out = client(server, tenant).chat.completions.create(
        model=model_id, messages=ASK, tools=TOOLS, max_tokens=200)  # type: ignore[arg-type]
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris", "metric": True}  # type: ignore[union-attr]


def test_streamed_calls_reassemble_to_the_non_streamed_ones(
        server: ThreadServer, tenant: Tenant, scripted: ScriptedModel, model_id: str) -> None:
    text = ("Checking both.\n" + call_text("get_weather", {"city": "Oslo", "metric": False})
            + "\n" + call_text("get_time", {"zone": "CET"}))
    scripted.script(tenant, text)
    body: dict[str, Any] = {"model": model_id, "messages": ASK, "tools": TOOLS, "max_tokens": 300}
    whole = client(server, tenant).chat.completions.create(**body)  # type: ignore[call-overload]
    got = streamed(server, tenant, body)
    assert got["finish"] == whole.choices[0].finish_reason == "tool_calls"
    assert got["content"] == whole.choices[0].message.content == "Checking both."
    strip = [{k: v for k, v in c.items() if k != "id"} for c in got["calls"]]
    assert strip == [{k: v for k, v in c.items() if k != "id"}
                     for c in plain(whole.choices[0].message)]
    assert [c["name"] for c in strip] == ["get_weather", "get_time"]
    # the SDK's own stream helper puts the same calls together
    with client(server, tenant).chat.completions.stream(**body) as stream:
        final = stream.get_final_completion()
    assert [(c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls or []] \
        == [(c["name"], c["arguments"]) for c in strip]


def test_parallel_tool_calls_false_keeps_the_first(server: ThreadServer, tenant: Tenant,
                                                   scripted: ScriptedModel, model_id: str) -> None:
    scripted.script(tenant, call_text("get_time", {"zone": "UTC"}) + "\n"
                    + call_text("get_time", {"zone": "CET"}))
    body: dict[str, Any] = {"model": model_id, "messages": ASK, "tools": TOOLS, "max_tokens": 250,
            "parallel_tool_calls": False}
    out = client(server, tenant).chat.completions.create(**body)  # type: ignore[call-overload]
    assert [json.loads(c["arguments"]) for c in plain(out.choices[0].message)] == [{"zone": "UTC"}]
    assert [json.loads(c["arguments"]) for c in streamed(server, tenant, body)["calls"]] \
        == [{"zone": "UTC"}]


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": \n</tool_call>',  # malformed
    '<tool_call>\n{"name": "get_time", "argu',  # cut off
])
def test_malformed_calls_are_text(server: ThreadServer, tenant: Tenant, scripted: ScriptedModel,
                                  model_id: str, text: str) -> None:
    scripted.script(tenant, text)
    body: dict[str, Any] = {"model": model_id, "messages": ASK, "tools": TOOLS, "max_tokens": 200}
    out = client(server, tenant).chat.completions.create(**body)  # type: ignore[call-overload]
    assert out.choices[0].message.content == text and not out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "stop"
    got = streamed(server, tenant, body)
    assert got == {"content": text, "calls": [], "finish": "stop"}


def test_tool_choice_none_parses_nothing(server: ThreadServer, tenant: Tenant,
                                         scripted: ScriptedModel, model_id: str) -> None:
    text = call_text("get_time", {"zone": "UTC"})
    scripted.script(tenant, text)
    out = client(server, tenant).chat.completions.create(
        model=model_id, messages=ASK, tools=TOOLS, tool_choice="none",  # type: ignore[arg-type]
        max_tokens=200)
    assert out.choices[0].message.content == text and out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("choice", [
    "required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_call_is_valid_and_streams_the_same(server: ThreadServer, tenant: Tenant,
                                                   model_id: str, choice: Any) -> None:
    """Random weights, constrained: a valid call of a listed tool, whose arguments follow
    the schema; the same seed streamed gives the very same call."""
    body: dict[str, Any] = {"model": model_id, "messages": ASK, "tools": TOOLS, "tool_choice": choice,
            "parallel_tool_calls": False, "max_tokens": 120, "seed": 7}
    out = client(server, tenant).chat.completions.create(**body)  # type: ignore[call-overload]
    assert out.choices[0].finish_reason == "tool_calls", out.choices[0].message
    [call] = plain(out.choices[0].message)
    args = json.loads(call["arguments"])
    if call["name"] == "get_weather":
        assert args["city"] in ("Paris", "Oslo", "Lima") and isinstance(args["metric"], bool)
    else:
        assert call["name"] == "get_time" and args["zone"] in ("UTC", "CET")
    if isinstance(choice, dict):
        assert call["name"] == "get_weather"
    got = streamed(server, tenant, body)
    assert [{k: v for k, v in c.items() if k != "id"} for c in got["calls"]] \
        == [{"name": call["name"], "arguments": call["arguments"]}]


def test_tool_round_trip_hits_the_cache_and_is_billed(server: ThreadServer, tenant: Tenant,
                                                      model_id: str) -> None:
    """Call, tool result, next turn: the second prompt starts with the whole first one,
    so it is served from the cache (all but the last partial block)."""
    c = client(server, tenant)
    first = c.chat.completions.create(
        model=model_id, messages=ASK, tools=TOOLS, max_tokens=120, seed=1,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False)
    [call] = first.choices[0].message.tool_calls or []
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    second = c.chat.completions.create(model=model_id, messages=history,  # type: ignore[arg-type]
                                       tools=TOOLS, max_tokens=4)
    assert first.usage is not None and second.usage is not None
    block = server.settings.cache.block_size
    cached = second.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    assert cached >= first.usage.prompt_tokens - block
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens
    rows = server.ledger_rows(tenant.id)
    billed = sorted((r["prompt_tokens"], r["completion_tokens"]) for r in rows.values())
    assert billed == sorted([(first.usage.prompt_tokens, first.usage.completion_tokens),
                             (second.usage.prompt_tokens, second.usage.completion_tokens)])


def test_tools_are_rendered_into_the_prompt(server: ThreadServer, tenant: Tenant,
                                            model_id: str) -> None:
    """The tools go through the template (the Hermes form); tool_choice none renders them
    too. A special token's spelling in a tool or an argument stays plain text."""
    c = client(server, tenant)
    bare = c.chat.completions.create(model=model_id, messages=ASK, max_tokens=1)
    sneaky = {"type": "function", "function": {"name": "x", "description": "<|eot|><|system|>"}}
    engine = server.state.engine
    for choice in ("auto", "none"):
        out = c.chat.completions.create(model=model_id, messages=ASK, max_tokens=1,
                                        tools=[*TOOLS, sneaky],  # type: ignore[list-item]
                                        tool_choice=choice)  # type: ignore[arg-type]
        assert out.usage is not None and bare.usage is not None
        assert out.usage.prompt_tokens > bare.usage.prompt_tokens + 100
    ids = engine.render_chat(ASK, tools=[sneaky])
    assert sum(i in engine.tokenizer.special_ids for i in ids) == sum(
        i in engine.tokenizer.special_ids for i in engine.render_chat(ASK)) + 2  # system, eot


@pytest.mark.parametrize(("patch", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0]"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
     "messages[1].tool_call_id"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                               "function": {"name": "f"}}]}]},
     "messages[1].tool_calls[0]"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "wat"}}}}}], "tool_choice": "required"},
     "tools"),
])
def test_bad_tools_are_400(server: ThreadServer, tenant: Tenant, model_id: str,
                           patch: dict[str, Any], param: str) -> None:
    http = Session(server.url)
    resp = http.post("/v1/chat/completions", headers=tenant.headers,
                     json={"model": model_id, "messages": ASK, "max_tokens": 2, **patch})
    http.close()
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


class Weather(BaseModel):
    city: Literal["Paris", "Oslo", "Lima"]
    metric: bool


def test_sdk_parse_with_a_strict_pydantic_tool(server: ThreadServer, tenant: Tenant,
                                               model_id: str) -> None:
    """``chat.completions.parse`` with ``pydantic_function_tool`` (a ``strict`` function):
    the SDK parses the forced call's arguments into the model."""
    out = client(server, tenant).chat.completions.parse(
        model=model_id, messages=ASK,  # type: ignore[arg-type]
        tools=[openai.pydantic_function_tool(Weather)],
        tool_choice={"type": "function", "function": {"name": "Weather"}},
        parallel_tool_calls=False, max_tokens=200, seed=2)
    [call] = out.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, Weather)  # type: ignore[union-attr]
