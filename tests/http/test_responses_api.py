"""The Responses API against the real server with the official openai SDK: create (plain and
streamed), stored responses per tenant (GET, DELETE, expiry, isolation), continuation with
``previous_response_id`` served from the prefix cache, errors in OpenAI's shape, billing."""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any, Literal

import openai
import pydantic
import pytest

from tests.support import Session, Tenant, ThreadServer, iter_sse, shapes

INSTRUCTIONS = ("You are a terse assistant for the kvgate Responses API tests. " * 4).strip()
STREAM_EVENTS = ("response.created", "response.in_progress", "response.output_item.added",
                 "response.content_part.added")
STREAM_END = ("response.output_text.done", "response.content_part.done",
              "response.output_item.done")


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
    block = server.settings.block_size
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
    from gateway.http.responses_api import STORE

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
    assert len(server.ledger_rows(tenant.id)) == before  # nothing generated, nothing billed


@pytest.mark.skipif(importlib.util.find_spec("gateway.engine.structured") is None,
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


@pytest.mark.skip(reason="function tools on /v1/responses wait for the tool-call parsers and "
                         "the template with tools (gateway/http/tools.py is still in progress)")
def test_function_tools() -> None:
    raise AssertionError("not implemented")
