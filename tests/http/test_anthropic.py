"""The official anthropic SDK against the real server, with cache_control breakpoints."""

from __future__ import annotations

import json

import anthropic
import pytest

from testkit import Session, Tenant, ThreadServer, iter_sse, shapes

pytestmark = pytest.mark.both_engines  # against both engine layouts (conftest.py)

SYSTEM = ("Policy text that every request of this tenant repeats, long enough to span "
          "several cache blocks of sixteen tokens. " * 3).strip()
CONTEXT = "A shared document the user attaches to each question, spanning a few blocks too."


def client(server: ThreadServer, tenant: Tenant) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=tenant.key, max_retries=0)


def body(model: str, question: str = "What does it say?", **kw: object) -> dict:
    return {
        "model": model, "max_tokens": 4,
        "system": [{"type": "text", "text": SYSTEM,
                    "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": CONTEXT, "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": question}]}],
        **kw,
    }


def test_messages_sync_cache_control(server: ThreadServer, tenant: Tenant,
                                     model_id: str) -> None:
    c = client(server, tenant)
    raw = c.messages.with_raw_response.create(**body(model_id))
    shapes.check_anthropic("Message", raw.http_response.json())
    first = raw.parse()
    assert first.type == "message" and first.content[0].type == "text"
    assert first.stop_reason in ("end_turn", "max_tokens")
    u = first.usage
    block = server.settings.cache.block_size
    system_tokens = len(SYSTEM.encode())  # byte-level demo tokenizer
    assert u.cache_read_input_tokens == 0
    assert u.cache_creation is not None
    # The system prompt's full blocks are written with the 1h class, the user's with 5m.
    assert u.cache_creation.ephemeral_1h_input_tokens >= system_tokens // block * block - block
    assert u.cache_creation.ephemeral_5m_input_tokens > 0
    assert u.cache_creation_input_tokens == (u.cache_creation.ephemeral_1h_input_tokens
                                             + u.cache_creation.ephemeral_5m_input_tokens)
    assert 0 <= u.input_tokens < block + 1  # only the tail under one block is uncached
    prompt = u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens

    second = c.messages.create(**body(model_id))
    v = second.usage
    assert v.input_tokens + v.cache_read_input_tokens + v.cache_creation_input_tokens == prompt
    assert v.cache_read_input_tokens >= u.cache_creation_input_tokens - block
    assert v.cache_read_input_tokens > 0


def test_top_level_cache_control_and_string_content(server: ThreadServer, tenant: Tenant,
                                                    model_id: str) -> None:
    req = {"model": model_id, "max_tokens": 2, "system": SYSTEM,
           "cache_control": {"type": "ephemeral", "ttl": "1h"},
           "messages": [{"role": "user", "content": "plain string content"}]}
    u = client(server, tenant).messages.create(**req).usage
    assert u.cache_creation is not None
    assert u.cache_creation.ephemeral_1h_input_tokens > 0
    assert u.cache_creation.ephemeral_5m_input_tokens == 0


def test_messages_stream(server: ThreadServer, tenant: Tenant, model_id: str) -> None:
    c = client(server, tenant)
    c.messages.create(**body(model_id, "warm the cache"))
    with c.messages.stream(**body(model_id, "warm the cache")) as stream:
        events = list(stream)
        final = stream.get_final_message()
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert final.content[0].text == text
    # message_start already carries the real cache split, equal to the billed one.
    start = next(e for e in events if e.type == "message_start").message.usage
    assert start.cache_read_input_tokens == final.usage.cache_read_input_tokens
    assert start.input_tokens == final.usage.input_tokens
    assert start.cache_creation_input_tokens == final.usage.cache_creation_input_tokens
    assert final.usage.cache_read_input_tokens is not None
    assert final.usage.cache_read_input_tokens > 0
    assert final.usage.output_tokens <= 4


def test_stream_event_sequence(server: ThreadServer, tenant: Tenant, http: Session,
                               model_id: str) -> None:
    with http.post("/v1/messages", json=body(model_id, stream=True), stream=True,
                   headers={"x-api-key": tenant.key, "anthropic-version": "2023-06-01"}) as r:
        assert r.status_code == 200
        events = list(iter_sse(r))
    for e in events:
        if e.event != "ping":  # not a message event: the SDK skips it
            shapes.check_anthropic("RawMessageStreamEvent", e.json())
    names = [e.event for e in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) <= {"content_block_delta"}


def test_anthropic_error_shape(server: ThreadServer, tenant: Tenant, http: Session,
                               model_id: str) -> None:
    r = http.post("/v1/messages", data=b"{not json", headers={
        "x-api-key": tenant.key, "content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"
    try:
        client(server, tenant).messages.create(model="no-such-model", max_tokens=2,
                                               messages=[{"role": "user", "content": "x"}])
    except anthropic.NotFoundError as exc:
        assert json.loads(exc.response.text)["error"]["type"] == "not_found_error"
    else:
        raise AssertionError("unknown model was accepted")
