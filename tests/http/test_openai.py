"""The official openai SDK against the real server: sync, async, streaming, prefix cache."""

from __future__ import annotations

import openai
import pytest

from testkit import Admin, Session, Tenant, ThreadServer, iter_sse, request_body, shapes

pytestmark = pytest.mark.both_engines  # against both engine layouts (conftest.py)

LONG_SYSTEM = ("You are a terse assistant for the kvgate test suite. " * 6).strip()


def client(server: ThreadServer, tenant: Tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=tenant.key, max_retries=0)


def chat(model: str, text: str = "hello", max_tokens: int = 4, **kw: object) -> dict:
    return request_body("chat", text, max_tokens, system=LONG_SYSTEM, model=model, **kw).body


def test_models_list(server: ThreadServer, tenant: Tenant, http: Session, model_id: str) -> None:
    models = client(server, tenant).models.list()
    assert [m.id for m in models.data] == [model_id]
    raw = http.get("/v1/models", headers={"Authorization": f"Bearer {tenant.key}"})
    shapes.check_openai("ModelList", raw.json())
    assert "meaningless" in raw.json()["data"][0]["note"]  # the demo model says so


def test_chat_sync_response_matches_schema(server: ThreadServer, tenant: Tenant,
                                           http: Session, model_id: str) -> None:
    c = client(server, tenant).chat.completions.create(**chat(model_id))
    assert c.choices[0].finish_reason in ("stop", "length")
    assert c.usage is not None and c.usage.completion_tokens <= 4
    assert c.usage.prompt_tokens_details is not None
    assert c.usage.prompt_tokens_details.cached_tokens == 0
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    raw = http.post("/v1/chat/completions", json=chat(model_id, "again"),
                    headers={"Authorization": f"Bearer {tenant.key}"})
    assert raw.status_code == 200
    shapes.check_openai("ChatCompletion", raw.json())


async def test_chat_async(server: ThreadServer, tenant: Tenant, model_id: str) -> None:
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=tenant.key,
                                  max_retries=0) as ac:
        c = await ac.chat.completions.create(**chat(model_id, "async"))
        assert c.object == "chat.completion"
        assert c.usage is not None and c.usage.prompt_tokens > 0
        stream = await ac.chat.completions.create(
            **chat(model_id, "async stream"), stream=True,
            stream_options={"include_usage": True})
        chunks = [ch async for ch in stream]
    assert chunks[-1].usage is not None and chunks[-1].choices == []


def test_chat_stream_sdk(server: ThreadServer, tenant: Tenant, model_id: str) -> None:
    stream = client(server, tenant).chat.completions.create(
        **chat(model_id, "stream", max_tokens=6), stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finish[-1] in ("stop", "length") and all(f is None for f in finish[:-1])
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens <= 6
    assert usage.prompt_tokens_details is not None
    assert isinstance(text, str)


def test_stream_chunks_match_schema(server: ThreadServer, tenant: Tenant, http: Session,
                                    model_id: str) -> None:
    auth = {"Authorization": f"Bearer {tenant.key}"}
    for path, body, schema in (
        ("/v1/chat/completions", chat(model_id, "raw", stream=True,
                                      stream_options={"include_usage": True}),
         "ChatCompletionChunk"),
        ("/v1/completions", {"model": model_id, "prompt": "raw completion", "max_tokens": 3,
                             "stream": True, "stream_options": {"include_usage": True}},
         "CompletionChunk"),
    ):
        with http.post(path, json=body, headers=auth, stream=True) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert "engine;dur=" in r.headers["server-timing"]
            events = list(iter_sse(r))
        assert events[-1].done
        chunks = [e.json() for e in events[:-1]]
        for ch in chunks:
            shapes.check_openai(schema, ch)
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0


def test_completions_sync(server: ThreadServer, tenant: Tenant, http: Session,
                          model_id: str) -> None:
    c = client(server, tenant).completions.create(model=model_id, prompt="Once upon",
                                                  max_tokens=3)
    assert c.object == "text_completion" and c.usage is not None
    assert c.usage.prompt_tokens == len(b"Once upon")  # demo: byte-level tokens
    raw = http.post("/v1/completions", json={"model": model_id, "prompt": [1, 2, 3],
                                             "max_tokens": 2},
                    headers={"Authorization": f"Bearer {tenant.key}"})
    assert raw.status_code == 200, raw.text
    shapes.check_openai("Completion", raw.json())
    assert raw.json()["usage"]["prompt_tokens"] == 3


def test_prefix_cache_hits_within_tenant_only(server: ThreadServer, admin: Admin,
                                              model_id: str) -> None:
    a, b = admin.tenant(), admin.tenant()
    body = chat(model_id, "same question")
    first = client(server, a).chat.completions.create(**body)
    second = client(server, a).chat.completions.create(**body)
    # Nothing in the request can pick the namespace: try to name tenant a's.
    other = client(server, b).chat.completions.create(
        **body, user=f"tenant:{a.id}", extra_body={"namespace": f"tenant:{a.id}"},
        extra_headers={"x-kvgate-namespace": f"tenant:{a.id}"})
    assert first.usage and second.usage and other.usage
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # type: ignore[union-attr]
    cached = second.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    block = server.settings.cache.block_size
    # everything but the tail under one block (and the last token, always computed)
    assert cached >= (second.usage.prompt_tokens - 1) // block * block - block
    assert cached > 0 and cached % block == 0
    assert other.usage.prompt_tokens_details.cached_tokens == 0  # type: ignore[union-attr]


def test_request_id_and_server_timing(server: ThreadServer, tenant: Tenant, http: Session,
                                      model_id: str) -> None:
    auth = {"Authorization": f"Bearer {tenant.key}"}
    r = http.post("/v1/chat/completions", json=chat(model_id),
                  headers={**auth, "x-request-id": "client-abc.123"})
    assert r.headers["x-request-id"] == "client-abc.123"
    timing = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
    assert float(timing["engine"]) > 0 and float(timing["total"]) >= float(timing["engine"])
    assert 0 <= float(timing["ledger"]) <= float(timing["total"]) - float(timing["engine"]) + 0.2
    r = http.post("/v1/chat/completions", json=chat(model_id),
                  headers={**auth, "x-request-id": "bad id with spaces\u00e9"})
    assert r.headers["x-request-id"].startswith("req_")
    assert http.get("/healthz").headers["x-request-id"].startswith("req_")


def test_edge_sampling_values_answer_like_greedy(server: ThreadServer, tenant: Tenant,
                                                 model_id: str) -> None:
    """top_p 0 and a temperature near 0 are valid per the spec: they sample the argmax."""
    c = client(server, tenant)
    greedy = c.chat.completions.create(**chat(model_id, "edge", temperature=0))
    for kw in ({"top_p": 0}, {"temperature": 6e-5}, {"temperature": 1e-300},
               {"seed": 2**63 - 1, "temperature": 0}, {"seed": -(2**63), "temperature": 0}):
        got = c.chat.completions.create(**chat(model_id, "edge", **kw))
        assert got.choices[0].message.content == greedy.choices[0].message.content, kw
