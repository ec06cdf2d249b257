"""The Responses API against the real server with the official openai SDK: create (plain and
streamed), stored responses per tenant (GET, DELETE, expiry, isolation), continuation with
``previous_response_id`` served from the prefix cache, function tools (calls as output
items, streamed; call results as input items), errors in OpenAI's shape, billing."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import Iterator
from typing import Any, Literal

import jsonschema
import openai
import pydantic
import pytest

from kvgate.gateway.protocol.tool_parsers import HermesParser
from testkit import Session, Tenant, ThreadServer, iter_sse, shapes
from testkit.scripted import ScriptedModel

INSTRUCTIONS = ("You are a terse assistant for the kvgate Responses API tests. " * 4).strip()
STREAM_EVENTS = ("response.created", "response.in_progress", "response.output_item.added",
                 "response.content_part.added")
STREAM_END = ("response.output_text.done", "response.content_part.done",
              "response.output_item.done")
WEATHER_ARGS = {"type": "object", "properties": {
    "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
    "metric": {"type": "boolean"}}, "required": ["city", "metric"]}
TOOLS: Any = [
    {"type": "function", "name": "get_weather", "description": "The weather in a city.",
     "parameters": WEATHER_ARGS, "strict": True},
    {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]},
     "strict": False}]


def client(server: ThreadServer, tenant: Tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=tenant.key, max_retries=0)


def check_response(body: dict[str, Any]) -> None:
    """The SDK's strict model, and OpenAI's published schema."""
    shapes._check_sdk("Response", openai.types.responses.Response, body)
    if shapes.spec_available():
        shapes._check_spec("Response", body)


def check_event(body: dict[str, Any]) -> None:
    shapes._check_sdk("ResponseStreamEvent", openai.types.responses.ResponseStreamEvent, body)
    if shapes.spec_available():
        shapes._check_spec("ResponseStreamEvent", body)


def test_create_string_input(server: ThreadServer, tenant: Tenant, http: Session,
                             model_id: str) -> None:
    r = client(server, tenant).responses.create(model=model_id, input="hello",
                                                max_output_tokens=4, metadata={"k": "v"})
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.status in ("completed", "incomplete")
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    assert isinstance(r.output_text, str)
    assert r.metadata == {"k": "v"}
    assert r.usage is not None and 0 < r.usage.output_tokens <= 4
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    raw = http.post("/v1/responses", json={"model": model_id, "input": "raw",
                                           "max_output_tokens": 3, "instructions": "x"},
                    headers=tenant.headers)
    assert raw.status_code == 200, raw.text
    check_response(raw.json())
    assert raw.json()["instructions"] == "x"
    rows = server.ledger_rows(tenant.id)
    assert len(rows) == 2 and all(row["n"] == 1 for row in rows.values())
    assert sorted(row["completion_tokens"] for row in rows.values()) == sorted(
        [r.usage.output_tokens, raw.json()["usage"]["output_tokens"]])


def test_item_input_and_instructions(server: ThreadServer, tenant: Tenant,
                                     model_id: str) -> None:
    c = client(server, tenant)
    items: Any = [
        {"role": "developer", "content": "Answer briefly."},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "first"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
        {"role": "user", "content": "second"},
    ]
    plain = c.responses.create(model=model_id, input=[items[-1]], max_output_tokens=2)
    longer = c.responses.create(model=model_id, input=items, instructions=INSTRUCTIONS,
                                max_output_tokens=2)
    assert longer.usage is not None and plain.usage is not None
    assert longer.usage.input_tokens > plain.usage.input_tokens + len(INSTRUCTIONS)


def test_stream_events(server: ThreadServer, tenant: Tenant, http: Session,
                       model_id: str) -> None:
    body = {"model": model_id, "input": "stream", "max_output_tokens": 5, "stream": True}
    with http.post("/v1/responses", json=body, headers=tenant.headers, stream=True) as r:
        assert r.status_code == 200
        events = [(e.event, e.json()) for e in iter_sse(r)]
    names = [name for name, _ in events]
    assert tuple(names[:4]) == STREAM_EVENTS
    assert tuple(names[-4:-1]) == STREAM_END
    assert names[-1] in ("response.completed", "response.incomplete")
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    for name, data in events:
        assert data["type"] == name
        check_event(data)
    text = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    final = events[-1][1]["response"]
    assert final["output"][0]["content"][0]["text"] == text
    assert final["usage"]["output_tokens"] <= 5
    got = http.get(f"/v1/responses/{final['id']}", headers=tenant.headers)
    assert got.status_code == 200 and got.json() == final


def test_stream_with_the_sdk(server: ThreadServer, tenant: Tenant, model_id: str) -> None:
    c = client(server, tenant)
    with c.responses.stream(model=model_id, input="sdk stream", max_output_tokens=4) as s:
        events = list(s)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    last = events[-1]
    # max_output_tokens reached ends in response.incomplete (as OpenAI's API does), for
    # which the SDK's get_final_response() has no answer; an EOS ends in completed
    assert last.type in ("response.completed", "response.incomplete")
    final = s.get_final_response() if last.type == "response.completed" else last.response
    assert final.output_text == "".join(deltas)
    assert final.usage is not None and final.usage.output_tokens <= 4
    events = list(c.responses.create(model=model_id, input="raw", max_output_tokens=2,
                                     stream=True))
    assert events[-1].type in ("response.completed", "response.incomplete")


async def test_async_client(server: ThreadServer, tenant: Tenant, model_id: str) -> None:
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=tenant.key,
                                  max_retries=0) as ac:
        r = await ac.responses.create(model=model_id, input="async", max_output_tokens=2)
        again = await ac.responses.retrieve(r.id)
    assert again.id == r.id and again.output_text == r.output_text
    await asyncio.sleep(0)


def test_previous_response_id_hits_the_cache(server: ThreadServer, tenant: Tenant,
                                             model_id: str) -> None:
    """The second turn's prompt starts with the first turn's prompt and output as the
    engine computed them: all of it but the last partial block comes from the cache."""
    c = client(server, tenant)
    block = server.settings.cache.block_size
    first = c.responses.create(model=model_id, input="tell me a story", temperature=1.0,
                               instructions=INSTRUCTIONS, max_output_tokens=24)
    assert first.usage is not None
    second = c.responses.create(model=model_id, input="and then?", instructions=INSTRUCTIONS,
                                previous_response_id=first.id, max_output_tokens=8)
    assert second.usage is not None and second.previous_response_id == first.id
    earlier = first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens > earlier
    assert second.usage.input_tokens_details.cached_tokens >= earlier - block
    third = c.responses.create(model=model_id, input="the end", instructions=INSTRUCTIONS,
                               previous_response_id=second.id, max_output_tokens=4)
    assert third.usage is not None
    earlier = second.usage.input_tokens + second.usage.output_tokens
    assert third.usage.input_tokens_details.cached_tokens >= earlier - block
    rows = server.ledger_rows(tenant.id)
    assert sorted(r["cached_tokens"] for r in rows.values()) == sorted(
        u.input_tokens_details.cached_tokens for u in (first.usage, second.usage, third.usage))


def test_stored_responses_are_per_tenant(server: ThreadServer, tenant: Tenant,
                                         http: Session, model_id: str) -> None:
    other = server.admin.tenant()
    r = client(server, tenant).responses.create(model=model_id, input="mine",
                                                max_output_tokens=2)
    theirs = client(server, other)
    with pytest.raises(openai.NotFoundError):
        theirs.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as err:
        theirs.responses.create(model=model_id, input="steal", previous_response_id=r.id,
                                max_output_tokens=2)
    assert err.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert http.delete(f"/v1/responses/{r.id}", headers=other.headers).status_code == 404
    assert client(server, tenant).responses.retrieve(r.id).id == r.id  # still there


def test_get_delete_and_not_stored(server: ThreadServer, tenant: Tenant, http: Session,
                                   model_id: str) -> None:
    c = client(server, tenant)
    r = c.responses.create(model=model_id, input="keep", max_output_tokens=2)
    got = http.get(f"/v1/responses/{r.id}", headers=tenant.headers)
    assert got.status_code == 200
    check_response(got.json())
    gone = http.delete(f"/v1/responses/{r.id}", headers=tenant.headers)
    assert gone.status_code == 200
    assert gone.json() == {"id": r.id, "object": "response", "deleted": True}
    again = http.get(f"/v1/responses/{r.id}", headers=tenant.headers)
    assert again.status_code == 404
    assert set(again.json()["error"]) == {"message", "type", "param", "code"}
    unstored = c.responses.create(model=model_id, input="forget", store=False,
                                  max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)


def test_expired_responses_are_gone(server: ThreadServer, tenant: Tenant,
                                    model_id: str) -> None:
    from kvgate.gateway.http.responses.api import STORE

    c = client(server, tenant)
    r = c.responses.create(model=model_id, input="brief", max_output_tokens=2)
    store = server.app[STORE]["store"]  # type: ignore[index]
    asyncio.run_coroutine_threadsafe(store.expire_now(tenant.id, r.id),
                                     server._loop).result(30)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model=model_id, input="more", previous_response_id=r.id,
                           max_output_tokens=2)


@pytest.mark.parametrize(("patch", "param", "status"), [
    ({"input": [{"type": "function_call_output", "call_id": "call_nope", "output": "1"}]},
     "input[0].call_id", 400),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
     "input[0].arguments", 400),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", 400),
    ({"tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name", 400),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]},
     "tools[0].parameters", 400),
    ({"tools": [*TOOLS, TOOLS[0]]}, "tools", 400),
    ({"tool_choice": "required"}, "tool_choice", 400),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", 400),
    ({"tools": TOOLS, "tool_choice": {"type": "web_search_preview"}}, "tool_choice", 400),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", 400),
    ({"input": [{"type": "image_generation_call", "id": "x"}]}, "input[0].type", 400),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role", 400),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
     "input[0].content[0].type", 400),
    ({"input": []}, "input", 400),
    ({"input": 5}, "input", 400),
    ({"max_output_tokens": 0}, "max_output_tokens", 400),
    ({"temperature": 3}, "temperature", 400),
    ({"metadata": {"k": 1}}, "metadata", 400),
    ({"text": {"format": {"type": "yaml"}}}, "text.format", 400),
    ({"background": True}, "background", 400),
    ({"previous_response_id": "resp_nope"}, "previous_response_id", 404),
    ({"model": "nope"}, "model", 404),
])
def test_bad_input_is_refused_in_openai_shape(server: ThreadServer, tenant: Tenant,
                                              http: Session, model_id: str,
                                              patch: dict[str, Any], param: str,
                                              status: int) -> None:
    body = {"model": model_id, "input": "x", "max_output_tokens": 2, **patch}
    before = len(server.ledger_rows(tenant.id))
    r = http.post("/v1/responses", json=body, headers=tenant.headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert status != 400 or err["type"] == "invalid_request_error"
    for tool in patch.get("tools", []):  # an unknown tool type is named
        assert tool["type"] == "function" or repr(tool["type"]) in err["message"]
    assert len(server.ledger_rows(tenant.id)) == before  # nothing generated, nothing billed


@pytest.mark.skipif(importlib.util.find_spec("kvgate.gateway.engine.structured") is None,
                    reason="structured outputs (gateway.engine.structured) are not there yet")
def test_parse_with_a_pydantic_model(server: ThreadServer, tenant: Tenant,
                                     model_id: str) -> None:
    class Answer(pydantic.BaseModel):  # bounded, so random weights finish it in budget
        city: Literal["Paris", "Rome"]
        capital: bool

    r = client(server, tenant).responses.parse(model=model_id, input="a city",
                                               text_format=Answer, max_output_tokens=64)
    assert r.status == "completed"
    assert isinstance(r.output_parsed, Answer)
    assert r.text is not None and r.text.format.type == "json_schema"


# -- function tools --------------------------------------------------------------------------


@pytest.fixture()
def scripted(server: ThreadServer) -> Iterator[ScriptedModel]:
    with ScriptedModel(server.state.engine) as model:
        yield model


def call_text(name: str, args: dict[str, Any]) -> str:
    return HermesParser().emit(name, args)


def without_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in items]


def streamed_items(http: Session, tenant: Tenant, body: dict[str, Any]) -> tuple[
        list[dict[str, Any]], dict[str, Any]]:
    """A streamed response's items put together from its events as a client does (every
    event checked against the SDK's and OpenAI's schemas), and the final response."""
    with http.post("/v1/responses", json={**body, "stream": True}, headers=tenant.headers,
                   stream=True) as r:
        assert r.status_code == 200, r.text
        events = [e.json() for e in iter_sse(r)]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    added: dict[int, dict[str, Any]] = {}
    done: dict[int, dict[str, Any]] = {}
    for e in events:
        check_event(e)
        if e["type"] == "response.output_item.added":
            added[e["output_index"]] = dict(e["item"])
        elif e["type"] == "response.output_text.delta":
            added[e["output_index"]].setdefault("text", "")
            added[e["output_index"]]["text"] += e["delta"]
        elif e["type"] == "response.function_call_arguments.delta":
            assert added[e["output_index"]]["id"] == e["item_id"]
            added[e["output_index"]]["arguments"] += e["delta"]
        elif e["type"] == "response.function_call_arguments.done":
            item = added[e["output_index"]]
            assert (e["name"], e["arguments"]) == (item["name"], item["arguments"])
        elif e["type"] == "response.output_item.done":
            done[e["output_index"]] = e["item"]
    for i, item in added.items():  # what the deltas built is what the done item says
        if item["type"] == "function_call":
            assert item["arguments"] == done[i]["arguments"]
        else:
            assert item.get("text", "") == done[i]["content"][0]["text"]
    final = events[-1]["response"]
    assert final["output"] == [done[i] for i in sorted(done)] and sorted(done) == sorted(added)
    return final["output"], final


def test_function_call_plain_and_streamed(server: ThreadServer, tenant: Tenant, http: Session,
                                          scripted: ScriptedModel, model_id: str) -> None:
    """Text and two calls: a message item then function_call items; streamed, the same
    items (ids apart); the SDK's stream helper assembles the same calls."""
    scripted.script(tenant, "Checking both.\n" + call_text(
        "get_weather", {"city": "Oslo", "metric": False}) + "\n" + call_text(
        "get_time", {"zone": "CET"}))
    body = {"model": model_id, "input": "Weather and time in Oslo?", "tools": TOOLS,
            "max_output_tokens": 200}
    raw = http.post("/v1/responses", json=body, headers=tenant.headers)
    assert raw.status_code == 200, raw.text
    whole = raw.json()
    check_response(whole)
    assert whole["status"] == "completed"
    assert [i["type"] for i in whole["output"]] == ["message", "function_call", "function_call"]
    assert whole["output"][0]["content"][0]["text"] == "Checking both."
    weather, clock = whole["output"][1:]
    assert weather["id"].startswith("fc_") and weather["call_id"].startswith("call_")
    assert (weather["name"], json.loads(weather["arguments"])) == (
        "get_weather", {"city": "Oslo", "metric": False})
    assert (clock["name"], json.loads(clock["arguments"]), clock["status"]) == (
        "get_time", {"zone": "CET"}, "completed")
    assert whole["tools"][0] == {**TOOLS[0]} and whole["tools"][1]["description"] is None
    assert whole["tool_choice"] == "auto" and whole["parallel_tool_calls"] is True

    output, final = streamed_items(http, tenant, body)
    assert without_ids(output) == without_ids(whole["output"])
    assert final["status"] == "completed"

    c = client(server, tenant)
    sdk = c.responses.create(**body)
    assert [(o.name, o.arguments) for o in sdk.output if o.type == "function_call"] == [
        (o["name"], o["arguments"]) for o in whole["output"][1:]]
    with c.responses.stream(**body) as s:
        got = s.get_final_response()
    assert [(o.name, o.arguments) for o in got.output if o.type == "function_call"] == [
        (o["name"], o["arguments"]) for o in whole["output"][1:]]
    events = list(c.responses.create(**body, stream=True))
    assert events[-1].type == "response.completed"
    # parallel_tool_calls false: the first call only, streamed the same
    one = {**body, "parallel_tool_calls": False}
    first = http.post("/v1/responses", json=one, headers=tenant.headers).json()
    assert [i["type"] for i in first["output"]] == ["message", "function_call"]
    assert without_ids(streamed_items(http, tenant, one)[0]) == without_ids(first["output"])


def test_function_call_round_trip_hits_the_cache(server: ThreadServer, tenant: Tenant,
                                                 http: Session, scripted: ScriptedModel,
                                                 model_id: str) -> None:
    """A call, then its result with ``previous_response_id``: the second prompt starts
    with exactly what the first request computed, prompt and call alike, so all of it but
    the last partial block comes from the cache; the ledger bills what usage says."""
    # compact arguments, as a forced call writes them: the template writes a call its own
    # way, so the continuation must splice in what the model wrote to hit the cache
    scripted.script(tenant, '<tool_call>\n{"name": "get_weather", "arguments": '
                            '{"city":"Paris","metric":true}}\n</tool_call>')
    c = client(server, tenant)
    block = server.settings.cache.block_size
    first = c.responses.create(model=model_id, input="What is the weather in Paris?",
                               instructions=INSTRUCTIONS, tools=TOOLS, max_output_tokens=200)
    [call] = [o for o in first.output if o.type == "function_call"]
    assert first.usage is not None and first.status == "completed"
    second = c.responses.create(
        model=model_id, previous_response_id=first.id, instructions=INSTRUCTIONS, tools=TOOLS,
        input=[{"type": "function_call_output", "call_id": call.call_id,
                "output": '{"temp_c": 21}'}], max_output_tokens=4)
    assert second.usage is not None
    earlier = first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens > earlier
    assert second.usage.input_tokens_details.cached_tokens >= earlier - block
    rows = server.ledger_rows(tenant.id)
    assert sorted((r["prompt_tokens"], r["cached_tokens"], r["completion_tokens"])
                  for r in rows.values()) == sorted(
        (u.input_tokens, u.input_tokens_details.cached_tokens, u.output_tokens)
        for u in (first.usage, second.usage))
    assert all(r["n"] == 1 for r in rows.values())
    # the same turn replayed as items, without a stored response: the calls answer the
    # function_call item before them
    replay = [{"role": "user", "content": "What is the weather in Paris?"},
              *[o.model_dump(exclude_none=True) for o in first.output],
              {"type": "function_call_output", "call_id": call.call_id, "output": "21"}]
    r = http.post("/v1/responses", headers=tenant.headers, json={
        "model": model_id, "input": replay, "tools": TOOLS, "instructions": INSTRUCTIONS,
        "max_output_tokens": 2, "store": False})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["input_tokens_details"]["cached_tokens"] >= \
        first.usage.input_tokens - block


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_forced_call_follows_the_schema(server: ThreadServer, tenant: Tenant, http: Session,
                                        model_id: str, choice: Any) -> None:
    """Random weights, constrained: one call of a listed tool whose arguments validate
    against its schema."""
    body = {"model": model_id, "input": "Weather?", "tools": TOOLS, "tool_choice": choice,
            "parallel_tool_calls": False, "max_output_tokens": 120}
    r = http.post("/v1/responses", json=body, headers=tenant.headers)
    assert r.status_code == 200, r.text
    out = r.json()
    check_response(out)
    [call] = [o for o in out["output"] if o["type"] == "function_call"]
    schema = {t["name"]: t["parameters"] for t in TOOLS}[call["name"]]
    jsonschema.validate(json.loads(call["arguments"]), schema)
    if isinstance(choice, dict):
        assert call["name"] == "get_weather" and out["tool_choice"] == choice
    assert out["parallel_tool_calls"] is False
