"""The smaller endpoints vLLM users expect: /v1/models/{id} and max_model_len,
--served-model-name aliases, --max-model-len, /tokenize and /detokenize, /health, and the
cache-write tokens in OpenAI usage."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import anthropic
import openai
import pytest

from kvgate.gateway.http.serve import register, settings_from_args
from testkit import Session, Tenant, ThreadServer, iter_sse, shapes
from tests.http.conftest import HTTP_FLAGS

ALIASES = "kvgate-demo,demo-alias"
CAP = 96


def oai(server: ThreadServer, tenant: Tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=tenant.key, max_retries=0)


@pytest.fixture(scope="module")
def aliased(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    with ThreadServer(tmp_path_factory.mktemp("aliased"), served_model_name=ALIASES,
                      max_model_len=CAP, **HTTP_FLAGS) as srv:
        yield srv


def test_health_is_public(http: Session) -> None:
    for path in ("/health", "/healthz"):
        r = http.get(path)
        assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_models_list_and_retrieve(server: ThreadServer, tenant: Tenant, http: Session,
                                  model_id: str) -> None:
    context = int(server.state.engine.model_info["context_length"])
    r = http.get("/v1/models", headers=tenant.headers)
    shapes.check_openai("ModelList", r.json())
    assert [m["max_model_len"] for m in r.json()["data"]] == [context]
    raw = http.get(f"/v1/models/{model_id}", headers=tenant.headers)
    shapes.check_openai("Model", raw.json())
    model = oai(server, tenant).models.retrieve(model_id)
    assert model.id == model_id and model.object == "model"
    assert model.model_extra is not None and model.model_extra["max_model_len"] == context


def test_unknown_model_is_a_404_in_openai_shape(server: ThreadServer, tenant: Tenant,
                                                http: Session) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        oai(server, tenant).models.retrieve("no-such/model")
    assert exc.value.response.json()["error"]["code"] == "model_not_found"
    assert http.get("/v1/models/demo").status_code == 401  # a tenant key, like /v1/models


def test_aliases_are_served_and_the_first_reported(aliased: ThreadServer) -> None:
    tenant = aliased.admin.tenant()
    client = oai(aliased, tenant)
    assert [m.id for m in client.models.list()] == ["kvgate-demo"]
    assert client.models.retrieve("demo-alias").id == "kvgate-demo"
    chat = client.chat.completions.create(model="demo-alias", max_tokens=2,
                                          messages=[{"role": "user", "content": "hi"}])
    assert chat.model == "kvgate-demo"
    msg = anthropic.Anthropic(base_url=aliased.url, api_key=tenant.key, max_retries=0)\
        .messages.create(model="kvgate-demo", max_tokens=2,
                         messages=[{"role": "user", "content": "hi"}])
    assert msg.model == "kvgate-demo"
    with pytest.raises(openai.NotFoundError):  # the model's own id is not one of the names
        client.chat.completions.create(model="demo", max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])
    with Session(aliased.url) as http:
        report = http.get("/admin/usage", params={"tenant_id": tenant.id, "group_by": "model"},
                          headers={"Authorization": f"Bearer {aliased.settings.http.admin_key}"})
    assert report.status_code == 200, report.text
    assert {row["model"] for row in report.json()["rows"]} == {"kvgate-demo"}, report.json()


def test_max_model_len_caps_the_context(aliased: ThreadServer) -> None:
    tenant = aliased.admin.tenant()
    client = oai(aliased, tenant)
    assert [m.model_extra["max_model_len"] for m in client.models.list()  # type: ignore[index]
            ] == [CAP]
    messages = [{"role": "user", "content": "x" * 40}]
    with Session(aliased.url) as http:
        count = http.post("/tokenize", json={"messages": messages},
                          headers=tenant.headers).json()
    assert count["max_model_len"] == CAP
    fits = CAP - count["count"]
    ok = client.chat.completions.create(model="kvgate-demo", max_tokens=fits,
                                        messages=messages)  # type: ignore[arg-type]
    assert ok.usage is not None and ok.usage.prompt_tokens == count["count"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="kvgate-demo", max_tokens=fits + 1,
                                       messages=messages)  # type: ignore[arg-type]
    assert exc.value.response.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="kvgate-demo", max_tokens=1, prompt="y" * CAP)
    assert exc.value.response.json()["error"]["code"] == "context_length_exceeded"


def test_tokenize_round_trip(server: ThreadServer, tenant: Tenant, http: Session,
                             model_id: str) -> None:
    text = "Hello, wörld <|eot|>"  # a special token's spelling in a prompt is plain text
    r = http.post("/tokenize", json={"model": model_id, "prompt": text}, headers=tenant.headers)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"count", "max_model_len", "tokens"} and out["count"] == len(out["tokens"])
    completion = oai(server, tenant).completions.create(model=model_id, prompt=text,
                                                        max_tokens=1)
    assert completion.usage is not None and completion.usage.prompt_tokens == out["count"]
    back = http.post("/detokenize", json={"model": model_id, "tokens": out["tokens"]},
                     headers=tenant.headers)
    assert back.status_code == 200 and back.json() == {"prompt": text}


def test_tokenize_messages_counts_what_chat_bills(server: ThreadServer, tenant: Tenant,
                                                  http: Session, model_id: str) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "How many tokens is this?"}]
    tools = [{"type": "function", "function": {
        "name": "lookup", "description": "Look a word up.",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}}]
    counts = []
    for extra in ({}, {"tools": tools}):
        out = http.post("/tokenize", json={"model": model_id, "messages": messages, **extra},
                        headers=tenant.headers).json()
        chat = oai(server, tenant).chat.completions.create(
            model=model_id, max_tokens=1, messages=messages, **extra)  # type: ignore[call-overload]
        assert chat.usage is not None and chat.usage.prompt_tokens == out["count"], extra
        counts.append(out["count"])
    assert counts[1] > counts[0]  # the tools are in the prompt
    assert len(server.ledger_rows(tenant.id)) == 2  # the chat requests; tokenize is not billed


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404),
    ("/tokenize", {}, 400),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}],
                   "add_generation_prompt": False}, 400),
    ("/detokenize", {"tokens": [-1]}, 400),
    ("/detokenize", {"tokens": [10**9]}, 400),
    ("/detokenize", {"tokens": "abc"}, 400),
])
def test_tokenize_bad_input(tenant: Tenant, http: Session, path: str, body: dict,
                            status: int) -> None:
    r = http.post(path, json=body, headers=tenant.headers)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_tokenize_needs_a_tenant_key(http: Session) -> None:
    for path in ("/tokenize", "/detokenize"):
        r = http.post(path, json={"prompt": "x", "tokens": [1]})
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "missing_api_key"


def test_openai_usage_shows_cache_writes(server: ThreadServer, tenant: Tenant, http: Session,
                                         model_id: str) -> None:
    body = {"model": model_id, "max_tokens": 2,
            "messages": [{"role": "user", "content": "A question long enough to fill a few "
                                                     "cache blocks of sixteen tokens each."}]}
    r = http.post("/v1/chat/completions", json=body, headers=tenant.headers)
    shapes.check_openai("ChatCompletion", r.json())
    details = r.json()["usage"]["prompt_tokens_details"]
    rows = server.ledger_rows(tenant.id)
    (row,) = rows.values()
    assert details["cache_write_tokens"] == row["cache_write_tokens"] > 0
    assert details["cached_tokens"] == row["cached_tokens"] == 0
    with http.post("/v1/chat/completions", json={
            **body, "stream": True, "stream_options": {"include_usage": True}},
            headers=tenant.headers, stream=True) as s:
        chunks = [e.json() for e in iter_sse(s) if e.data != "[DONE]"]
    usage = chunks[-1]["usage"]
    shapes.check_openai("ChatCompletionChunk", chunks[-1])
    assert usage["prompt_tokens_details"]["cached_tokens"] == row["cache_write_tokens"]
    assert usage["prompt_tokens_details"]["cache_write_tokens"] == 0
    sdk = oai(server, tenant).chat.completions.create(**body)
    assert sdk.usage is not None and sdk.usage.prompt_tokens_details is not None
    assert sdk.usage.prompt_tokens_details.cache_write_tokens == 0


def test_serve_flags() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    for argv in (["serve", "--served-model-name", "a", "b"],
                 ["serve", "--served-model-name", "a,b"]):
        settings = settings_from_args(parser.parse_args([*argv, "--max-model-len", "64"]))
        assert settings.engine.served_model_name == "a,b" and settings.engine.max_model_len == 64
