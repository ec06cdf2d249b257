"""Part A of the agents issue over HTTP, with the official openai SDK: logprobs, n, penalties,
logit_bias, vLLM's top_k/min_p/repetition_penalty, echo and prompt lists on completions,
one ledger row per request, and a 400 naming each field we do not implement."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest

from testkit import Session, Tenant, ThreadServer, iter_sse, shapes


def client(server: ThreadServer, tenant: Tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=tenant.key, max_retries=0)


def one_row(server: ThreadServer, tenant: Tenant) -> dict[str, Any]:
    rows = server.ledger_rows(tenant.id)
    assert len(rows) == 1, rows
    row = next(iter(rows.values()))
    assert row["n"] == 1  # billed once
    return row


MSG = [{"role": "user", "content": "sample me"}]


def test_chat_n_and_logprobs(server: ThreadServer, tenant: Tenant, http: Session,
                             model_id: str) -> None:
    body: dict[str, Any] = dict(model=model_id, messages=MSG, max_tokens=5, n=3, seed=7,
                                logprobs=True, top_logprobs=2, temperature=1.0)
    raw = http.post("/v1/chat/completions", json=body, headers=_auth(tenant))
    assert raw.status_code == 200, raw.text
    shapes.check_openai("ChatCompletion", raw.json())
    c = client(server, tenant).chat.completions.create(**body)
    assert [ch.index for ch in c.choices] == [0, 1, 2]
    total = 0
    for ch in c.choices:
        assert ch.logprobs is not None and ch.logprobs.content is not None
        total += len(ch.logprobs.content)
        for t in ch.logprobs.content:
            assert t.logprob <= 0 and len(t.top_logprobs) == 2
            assert t.top_logprobs[0].logprob >= t.logprob - 1e-6
    assert c.usage is not None and c.usage.completion_tokens == total
    # the same seed gives the same choices; each equals an n=1 run with seed 7 + i
    assert raw.json()["choices"][1]["message"]["content"] == c.choices[1].message.content
    single = client(server, tenant).chat.completions.create(
        **{**body, "n": 1, "seed": 8})
    assert single.choices[0].message.content == c.choices[1].message.content
    assert c.usage.prompt_tokens == single.usage.prompt_tokens  # type: ignore[union-attr]


def test_chat_n_is_billed_once(server: ThreadServer, tenant: Tenant, model_id: str) -> None:
    c = client(server, tenant).chat.completions.create(
        model=model_id, messages=MSG, max_tokens=4, n=3, temperature=1.0, seed=1,
        extra_body={"ignore_eos": True})
    row = one_row(server, tenant)
    assert c.usage is not None
    assert row["prompt_tokens"] == c.usage.prompt_tokens  # the prompt once, not three times
    assert row["completion_tokens"] == c.usage.completion_tokens
    assert c.usage.completion_tokens == 12  # max_tokens each (vLLM's ignore_eos)


def test_chat_stream_with_n_and_logprobs(server: ThreadServer, tenant: Tenant, http: Session,
                                         model_id: str) -> None:
    body: dict[str, Any] = dict(model=model_id, messages=MSG, max_tokens=5, n=2, seed=3,
                                logprobs=True, top_logprobs=1, stream=True,
                                stream_options={"include_usage": True})
    with http.post("/v1/chat/completions", json=body, headers=_auth(tenant),
                   stream=True) as r:
        assert r.status_code == 200
        chunks = [e.json() for e in list(iter_sse(r))[:-1]]
    for ch in chunks:
        shapes.check_openai("ChatCompletionChunk", ch)
    text = {0: "", 1: ""}
    tokens = {0: 0, 1: 0}
    finishes = {}
    for ch in chunks:
        for c in ch["choices"]:
            text[c["index"]] += c["delta"].get("content") or ""
            tokens[c["index"]] += len((c.get("logprobs") or {}).get("content") or [])
            if c["finish_reason"]:
                finishes[c["index"]] = c["finish_reason"]
    assert sorted(finishes) == [0, 1]
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == tokens[0] + tokens[1]
    whole = client(server, tenant).chat.completions.create(
        **{k: v for k, v in body.items() if k not in ("stream", "stream_options")})
    assert [c.message.content for c in whole.choices] == [text[0], text[1]]
    # the SDK's own stream reader takes the chunks too
    sdk = list(client(server, tenant).chat.completions.create(**body))
    assert {c.index for ch in sdk for c in ch.choices} == {0, 1}


def test_logit_bias_forces_a_token_and_penalties_are_taken(
        server: ThreadServer, tenant: Tenant, model_id: str) -> None:
    token = server.state.engine.tokenizer.encode("z")[0]
    oa = client(server, tenant)
    c = oa.chat.completions.create(model=model_id, messages=MSG, max_tokens=4,
                                   logit_bias={str(token): 100}, temperature=1.0)
    assert c.choices[0].message.content == "zzzz"
    # a strong frequency penalty stops the forcing token from repeating against +5
    c = oa.chat.completions.create(model=model_id, messages=MSG, max_tokens=2,
                                   logit_bias={str(token): 5}, temperature=0.0,
                                   frequency_penalty=2.0, presence_penalty=2.0)
    assert c.choices[0].message.content != "zz"
    greedy = oa.chat.completions.create(model=model_id, messages=MSG, max_tokens=4,
                                        temperature=0.0)
    topk = oa.chat.completions.create(model=model_id, messages=MSG, max_tokens=4,
                                      temperature=1.0,
                                      extra_body={"top_k": 1, "min_p": 0.0,
                                                  "repetition_penalty": 1.0})
    assert topk.choices[0].message.content == greedy.choices[0].message.content


def test_completions_prompt_list_echo_n_and_logprobs(
        server: ThreadServer, tenant: Tenant, http: Session, model_id: str) -> None:
    body: dict[str, Any] = dict(model=model_id, prompt=["Once upon", [72, 105]], max_tokens=3,
                                n=2, seed=5, temperature=1.0, echo=True, ignore_eos=True)
    raw = http.post("/v1/completions", json=body, headers=_auth(tenant))
    assert raw.status_code == 200, raw.text
    data = raw.json()
    shapes.check_openai("Completion", data)
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    tok = server.state.engine.tokenizer
    assert data["choices"][0]["text"].startswith("Once upon")
    assert data["choices"][3]["text"].startswith(tok.decode([72, 105]))
    row = one_row(server, tenant)
    prompt_tokens = len(tok.encode("Once upon")) + 2
    assert data["usage"]["prompt_tokens"] == row["prompt_tokens"] == prompt_tokens
    assert data["usage"]["completion_tokens"] == row["completion_tokens"] == 12
    c = client(server, tenant).completions.create(
        model=model_id, prompt="Once upon", max_tokens=4, logprobs=2, temperature=0.0)
    lp = c.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and len(lp.tokens) == 4
    assert lp.token_logprobs is not None and all(v <= 0 for v in lp.token_logprobs)
    assert lp.top_logprobs is not None and all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset or [])


def test_completions_stream_with_prompt_list_and_n(
        server: ThreadServer, tenant: Tenant, http: Session, model_id: str) -> None:
    body: dict[str, Any] = dict(model=model_id, prompt=["a b", "c d"], max_tokens=3, n=2,
                                seed=9, temperature=1.0, logprobs=1, stream=True,
                                ignore_eos=True,
                                stream_options={"include_usage": True})
    with http.post("/v1/completions", json=body, headers=_auth(tenant), stream=True) as r:
        assert r.status_code == 200
        chunks = [e.json() for e in list(iter_sse(r))[:-1]]
    for ch in chunks:
        shapes.check_openai("CompletionChunk", ch)
    text: dict[int, str] = {}
    for ch in chunks:
        for c in ch["choices"]:
            text[c["index"]] = text.get(c["index"], "") + c["text"]
    rest = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "ignore_eos")}
    whole = client(server, tenant).completions.create(**rest, extra_body={"ignore_eos": True})
    assert {c.index: c.text for c in whole.choices} == text
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def test_anthropic_top_k_is_honoured(server: ThreadServer, tenant: Tenant,
                                     model_id: str) -> None:
    ac = anthropic.Anthropic(base_url=server.url, api_key=tenant.key, max_retries=0)
    kw: dict[str, Any] = dict(model=model_id, max_tokens=5,
                              messages=[{"role": "user", "content": "top k"}])
    # (this SDK version has no sampling arguments: they go as extra body fields)
    greedy = ac.messages.create(**kw, extra_body={"temperature": 0.0})
    topk = ac.messages.create(**kw, extra_body={"temperature": 1.0, "top_k": 1})
    assert greedy.content == topk.content


@pytest.mark.parametrize(("path", "extra", "named"), [
    ("/v1/chat/completions", {"best_of": 3}, "best_of"),
    ("/v1/chat/completions", {"use_beam_search": True}, "use_beam_search"),
    ("/v1/chat/completions", {"min_tokens": 4}, "min_tokens"),
    ("/v1/chat/completions", {"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"echo": True, "logprobs": 1}, "echo"),
    ("/v1/chat/completions", {"logit_bias": {"99999999": 5}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/chat/completions", {"n": 0}, "n"),
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"presence_penalty": 3}, "presence_penalty"),
    ("/v1/chat/completions", {"min_p": 2}, "min_p"),
    ("/v1/chat/completions", {"repetition_penalty": 0}, "repetition_penalty"),
])
def test_unimplemented_or_invalid_fields_get_a_400_naming_them(
        tenant: Tenant, http: Session, model_id: str, path: str, extra: dict[str, Any],
        named: str) -> None:
    body: dict[str, Any] = {"model": model_id, "max_tokens": 2, **extra}
    if path.endswith("chat/completions"):
        body["messages"] = MSG
    else:
        body["prompt"] = "hi"
    r = http.post(path, json=body, headers=_auth(tenant))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == named and named in err["message"]


def _auth(tenant: Tenant) -> dict[str, str]:
    return {"Authorization": f"Bearer {tenant.key}"}
