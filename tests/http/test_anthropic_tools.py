"""Anthropic tool use and count_tokens, with the official anthropic SDK on a real server.

The demo model's weights are random, so a scripted model (``testkit.scripted``)
answers where a test needs a tool call: it writes the call the way the model family does
(the Hermes form of the demo template), and the server must read it as a model's output.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import jsonschema
import pytest

from kvgate.gateway.protocol.anthropic import parse_conversation
from kvgate.gateway.protocol.tool_parsers import HermesParser
from testkit import Session, Tenant, ThreadServer, iter_sse, shapes
from testkit.scripted import ScriptedModel
from tests.http.conftest import HTTP_FLAGS

WEATHER = {"name": "get_weather", "description": "The weather in a city, now.",
           "input_schema": {"type": "object",
                            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                           "unit": {"type": "string",
                                                    "enum": ["celsius", "fahrenheit"]}},
                            "required": ["city", "unit"], "additionalProperties": False}}
TIME = {"name": "get_time", "description": "The local time in a city.",
        "input_schema": {"type": "object",
                         "properties": {"city": {"type": "string", "maxLength": 12}},
                         "required": ["city"]},
        "cache_control": {"type": "ephemeral", "ttl": "1h"}}
TOOLS = [WEATHER, TIME]
SYSTEM = "You answer questions about cities, calling the tools when they help. " * 3
QUESTION = "What is the weather in Paris, in celsius?"
ARGS = {"city": "Paris", "unit": "celsius"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    with ThreadServer(tmp_path_factory.mktemp("anthropic-tools"), **HTTP_FLAGS) as srv:
        yield srv


@pytest.fixture()
def model(server: ThreadServer) -> Iterator[ScriptedModel]:
    scripted = ScriptedModel(server.state.engine)
    yield scripted
    scripted.close()


@pytest.fixture()
def tenant(server: ThreadServer) -> Tenant:
    return server.admin.tenant()


@pytest.fixture()
def client(server: ThreadServer, tenant: Tenant) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=tenant.key, max_retries=0)


def request(**kw: Any) -> dict[str, Any]:
    return {"model": "demo", "max_tokens": 160, "tools": TOOLS, "system": SYSTEM,
            "messages": [{"role": "user", "content": QUESTION}], **kw}


def call_text(name: str, args: dict[str, Any], before: str = "") -> str:
    return before + HermesParser().emit(name, args)


def test_tool_use_create(client: anthropic.Anthropic, model: ScriptedModel) -> None:
    model.say(call_text("get_weather", ARGS, before="Let me look.\n"))
    raw = client.messages.with_raw_response.create(**request())
    shapes.check_anthropic("Message", raw.http_response.json())
    msg = raw.parse()
    assert msg.stop_reason == "tool_use"
    assert [b.type for b in msg.content] == ["text", "tool_use"]
    assert msg.content[0].type == "text" and msg.content[0].text == "Let me look."
    use = msg.content[1]
    assert use.type == "tool_use"
    assert use.id.startswith("toolu_") and use.name == "get_weather" and use.input == ARGS


def test_parallel_calls_and_disable_parallel(client: anthropic.Anthropic,
                                             model: ScriptedModel) -> None:
    model.say(call_text("get_weather", ARGS) + "\n" + call_text("get_time", {"city": "Oslo"}))
    both = client.messages.create(**request(max_tokens=256))
    assert [(b.type, getattr(b, "name", None)) for b in both.content] == [
        ("tool_use", "get_weather"), ("tool_use", "get_time")]
    ids = {b.id for b in both.content if b.type == "tool_use"}
    assert len(ids) == 2
    one = client.messages.create(**request(max_tokens=256, tool_choice={
        "type": "auto", "disable_parallel_tool_use": True}))
    assert [getattr(b, "name", None) for b in one.content] == ["get_weather"]
    assert one.stop_reason == "tool_use"


def test_tool_choice_none_reads_no_calls(client: anthropic.Anthropic,
                                         model: ScriptedModel) -> None:
    text = call_text("get_weather", ARGS)
    model.say(text)
    msg = client.messages.create(**request(tool_choice={"type": "none"}))
    assert msg.stop_reason == "end_turn"
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].type == "text" and msg.content[0].text == text


def test_malformed_call_is_text(client: anthropic.Anthropic, model: ScriptedModel) -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>'
    model.say(text)
    msg = client.messages.create(**request())
    assert msg.stop_reason == "end_turn"
    assert msg.content[0].type == "text" and msg.content[0].text == text


def test_tool_use_stream(server: ThreadServer, client: anthropic.Anthropic, tenant: Tenant,
                         model: ScriptedModel) -> None:
    model.say(call_text("get_weather", ARGS, before="Checking.\n"))
    whole = client.messages.create(**request())
    with client.messages.stream(**request()) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.model_dump(exclude={"id"}) for b in final.content] == \
        [b.model_dump(exclude={"id"}) for b in whole.content]
    starts = [e for e in events if e.type == "content_block_start"]
    assert [s.content_block.type for s in starts] == ["text", "tool_use"]
    tool_start = starts[1].content_block
    assert tool_start.type == "tool_use" and tool_start.input == {}
    partial = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta"
                      and e.delta.type == "input_json_delta")
    assert json.loads(partial) == ARGS
    # every event of the raw stream is one the SDK's types accept
    with Session(server.url) as http, http.post(
            "/v1/messages", json=request(stream=True), stream=True,
            headers={"x-api-key": tenant.key, "anthropic-version": "2023-06-01"}) as r:
        raw = list(iter_sse(r))
    for e in raw:
        if e.event != "ping":
            shapes.check_anthropic("RawMessageStreamEvent", e.json())


def test_tool_result_round_trip_hits_the_whole_conversation(
        server: ThreadServer, client: anthropic.Anthropic, model: ScriptedModel) -> None:
    script = model.say(call_text("get_weather", ARGS))
    first = client.messages.create(**request())
    use = next(b for b in first.content if b.type == "tool_use")
    u = first.usage
    first_prompt = u.input_tokens + (u.cache_read_input_tokens or 0) + \
        (u.cache_creation_input_tokens or 0)
    model.say("It is sunny in Paris.")
    history = [{"role": "user", "content": QUESTION},
               {"role": "assistant", "content": [b.model_dump() for b in first.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                             "content": [{"type": "text", "text": "21 C"}]}]}]
    second = client.messages.create(**request(messages=history))
    assert second.stop_reason == "end_turn"
    assert second.content[0].type == "text" and second.content[0].text == "It is sunny in Paris."
    block = server.settings.cache.block_size
    # Earlier prompt and the call the model wrote (its last token was never computed).
    earlier = first_prompt + len(script) - 1
    assert second.usage.cache_read_input_tokens is not None
    assert second.usage.cache_read_input_tokens >= earlier // block * block


def test_tools_and_system_hit_the_cache_on_the_second_request(
        server: ThreadServer, client: anthropic.Anthropic) -> None:
    system = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    first_body = request(system=system, max_tokens=2)
    second_body = request(system=system, max_tokens=2,
                          messages=[{"role": "user", "content": "Another question?"}])
    first = client.messages.create(**first_body)
    assert first.usage.cache_creation is not None
    # the breakpoint on the tools is the 1h class: their blocks are written as such
    assert first.usage.cache_creation.ephemeral_1h_input_tokens > 0
    second = client.messages.create(**second_body)
    engine = server.state.engine
    a, b = (parse_conversation(body).render(engine) for body in (first_body, second_body))
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    head = engine.tokenizer.decode(a[:shared], skip_special_tokens=False)
    assert SYSTEM in head and all(json.dumps(t["name"]) in head for t in TOOLS)
    block = server.settings.cache.block_size
    assert second.usage.cache_read_input_tokens == shared // block * block


def test_a_new_system_still_hits_on_the_tools(server: ThreadServer,
                                             client: anthropic.Anthropic) -> None:
    """Anthropic's cache order is tools, then system, then messages: the tools render
    first, so a request that changes only the system prompt still reads them cached."""
    first_body = request(system="You are terse.", max_tokens=2)
    second_body = request(system="You are verbose and kind.", max_tokens=2)
    client.messages.create(**first_body)
    second = client.messages.create(**second_body)
    engine = server.state.engine
    a, b = (parse_conversation(body).render(engine) for body in (first_body, second_body))
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    head = engine.tokenizer.decode(a[:shared], skip_special_tokens=False)
    assert all(json.dumps(t["name"]) in head for t in TOOLS) and "terse" not in head
    block = server.settings.cache.block_size
    assert shared >= 2 * block
    assert second.usage.cache_read_input_tokens == shared // block * block


def test_count_tokens_equals_the_real_input(client: anthropic.Anthropic,
                                            model: ScriptedModel) -> None:
    model.say("Fine.")
    body = request(max_tokens=4)
    counted = client.messages.count_tokens(
        model=body["model"], tools=body["tools"], system=body["system"],
        messages=body["messages"]).input_tokens
    u = client.messages.create(**body).usage
    assert counted == u.input_tokens + (u.cache_read_input_tokens or 0) + \
        (u.cache_creation_input_tokens or 0)
    plain = client.messages.count_tokens(model="demo",
                                         messages=[{"role": "user", "content": "hi"}])
    assert plain.input_tokens < counted


def test_count_tokens_is_not_billed(server: ThreadServer, client: anthropic.Anthropic,
                                    tenant: Tenant) -> None:
    client.messages.count_tokens(model="demo", messages=[{"role": "user", "content": "hi"}])
    assert server.ledger_rows(tenant.id) == {}


def test_forced_tool_choice_gives_a_valid_call(client: anthropic.Anthropic) -> None:
    """The random model itself, constrained: the output must be a call of the named tool
    whose input follows its schema."""
    for choice in ({"type": "tool", "name": "get_weather"}, {"type": "any"}):
        # one call: the grammar ends after it (with parallel calls a random model may go
        # on calling until max_tokens)
        choice = {**choice, "disable_parallel_tool_use": True}
        msg = client.messages.create(**request(tool_choice=choice))
        uses = [b for b in msg.content if b.type == "tool_use"]
        assert msg.stop_reason == "tool_use" and len(uses) == 1 == len(msg.content), msg
        for use in uses:
            tool = next(t for t in TOOLS if t["name"] == use.name)
            jsonschema.validate(use.input, tool["input_schema"])
        if choice["type"] == "tool":
            assert {u.name for u in uses} == {"get_weather"}


@pytest.mark.parametrize(("why", "change"), [
    ("tool_use without a tool_result", {"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                           "name": "get_weather", "input": ARGS}]},
        {"role": "user", "content": "no result here"}]}),
    ("tool_result with no tool_use", {"messages": [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x",
                                      "content": "1"}]}]}),
    ("bad schema", {"tools": [{"name": "t", "input_schema": {"type": "string"}}]}),
    ("schema missing", {"tools": [{"name": "t"}]}),
    ("bad tool name", {"tools": [{"name": "a b", "input_schema": {"type": "object"}}]}),
    ("duplicate tool", {"tools": [WEATHER, WEATHER]}),
    ("server tool", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
    ("unknown tool_choice name", {"tool_choice": {"type": "tool", "name": "nope"}}),
    ("unknown tool_choice type", {"tool_choice": {"type": "sometimes"}}),
    ("tool_choice any without tools", {"tools": [], "tool_choice": {"type": "any"}}),
    ("image block", {"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "AAAA"}}]}]}),
    ("too many breakpoints", {"system": [
        {"type": "text", "text": str(i), "cache_control": {"type": "ephemeral"}}
        for i in range(4)]}),
])
def test_bad_input_is_a_400_in_anthropic_shape(server: ThreadServer, tenant: Tenant, why: str,
                                               change: dict[str, Any]) -> None:
    with Session(server.url) as http:
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            r = http.post(path, json=request(**change), headers={"x-api-key": tenant.key})
            if path.endswith("count_tokens") and why == "too many breakpoints":
                continue  # counting renders the prompt, it does not place breakpoints
            assert r.status_code == 400, (why, path, r.text)
            body = r.json()
            assert body["type"] == "error", why
            assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]


def test_count_tokens_needs_a_tenant_key(server: ThreadServer) -> None:
    with Session(server.url) as http:
        r = http.post("/v1/messages/count_tokens", json=request())
    assert r.status_code == 401 and r.json()["type"] == "error"
