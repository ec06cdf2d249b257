"""Admission comes before work: a tenant over its request rate is turned away before its
body is parsed, rendered or tokenized, and counted; a big body is prepared on a worker
thread, not on the event loop."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from testkit import Admin, MiB, Session, Tenant, ThreadServer, request_body

CHAT = "/v1/chat/completions"


def _spy_render(server: ThreadServer, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the threads ``render_chat`` ran on, one per call."""
    engine = server.state.engine
    real: Callable[..., list[int]] = engine.render_chat
    threads: list[str] = []

    def spy(messages: list[dict[str, Any]], **kw: Any) -> list[int]:
        threads.append(threading.current_thread().name)
        return real(messages, **kw)

    monkeypatch.setattr(engine, "render_chat", spy)
    return threads


def _rejected(server: ThreadServer, reason: str, tenant_id: int) -> float:
    value = server.state.metrics.registry.get_sample_value(
        "kvgate_admission_rejected_total", {"reason": reason, "tenant": str(tenant_id)})
    return value or 0.0


def test_over_the_request_rate_nothing_is_read_or_rendered(
        server: ThreadServer, http: Session, admin: Admin,
        monkeypatch: pytest.MonkeyPatch) -> None:
    t = admin.tenant(requests_per_minute=1)
    threads = _spy_render(server, monkeypatch)
    ok = http.post(CHAT, json=request_body("chat", "hi", 2).body, headers=t.headers)
    assert ok.status_code == 200, ok.text
    assert len(threads) == 1
    big = request_body("chat", "word " * 40_000, 2).body
    r = http.post(CHAT, json=big, headers=t.headers)
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(r.headers["Retry-After"]) >= 1
    # malformed JSON too: a 429, not a 400, because the body is never parsed
    r = http.post(CHAT, data=b"{\"model\": ", headers={**t.headers,
                                                      "Content-Type": "application/json"})
    assert r.status_code == 429, r.text
    for path, kind in (("/v1/completions", "completions"), ("/v1/messages", "messages")):
        r = http.post(path, json=request_body(kind, "hi", 2).body, headers=t.headers)
        assert r.status_code == 429, r.text
    assert len(threads) == 1  # nothing rendered for any refused request
    assert _rejected(server, "requests_per_minute", t.id) == 4


def test_concurrency_limit_is_checked_before_the_body(
        server: ThreadServer, http: Session, admin: Admin) -> None:
    t = admin.tenant(max_concurrent=0)
    r = http.post(CHAT, data=b"not json at all", headers=t.headers)
    assert r.status_code == 429, r.text
    assert _rejected(server, "concurrency", t.id) == 1


def test_a_prompt_over_the_whole_token_limit_is_a_400_not_a_429_to_retry(
        server: ThreadServer, http: Session, admin: Admin) -> None:
    """Checked once tokenized; no wait would ever admit it, so clients must not retry."""
    t = admin.tenant(tokens_per_minute=5)
    r = http.post(CHAT, json=request_body("chat", "hi", 2).body, headers=t.headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "request_exceeds_limit"
    assert "Retry-After" not in r.headers
    assert _rejected(server, "tokens_per_minute", t.id) == 1


def test_a_spent_token_budget_refuses_before_the_body_is_read(
        server: ThreadServer, http: Session, admin: Admin,
        monkeypatch: pytest.MonkeyPatch) -> None:
    t = admin.tenant(tokens_per_minute=200)
    threads = _spy_render(server, monkeypatch)
    small = {**request_body("chat", "hi", 30).body, "ignore_eos": True}
    r = http.post(CHAT, json=small, headers=t.headers)
    assert r.status_code == 200, r.text
    prompt = r.json()["usage"]["prompt_tokens"]  # then one that spends the minute's rest
    rest = {**small, "max_tokens": 200 - (prompt + 30) - prompt}
    r = http.post(CHAT, json=rest, headers=t.headers)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == rest[
        "max_tokens"], r.text
    rendered = len(threads)
    big = request_body("chat", "word " * 40_000, 2).body
    r = http.post(CHAT, json=big, headers=t.headers)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1, r.text
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert len(threads) == rendered  # the big prompt was never rendered nor tokenized


def test_a_prompt_that_cannot_fit_is_refused_without_tokenizing(tmp_path: Path) -> None:
    """Each token stands for a bounded number of characters, so a text past
    context x bound is refused from its length alone (the 3.9 MB prompt of the report)."""
    with ThreadServer(tmp_path, device="cpu", device_cache_bytes=16 * MiB,
                      host_cache_bytes=16 * MiB, max_body_bytes=8 * MiB) as server, \
            Session(server.url) as http:
        _refused_untokenized(server, http, server.admin.tenant())


def _refused_untokenized(server: ThreadServer, http: Session, t: Tenant) -> None:
    tokenizer = server.state.engine.tokenizer
    assert tokenizer.max_tokens is not None and tokenizer._bytes_per_token is not None
    huge = "word " * (tokenizer.max_tokens * tokenizer._bytes_per_token // 5 + 1)
    for path, kind, param in ((CHAT, "chat", "messages"),
                              ("/v1/completions", "completions", "prompt"),
                              ("/v1/messages", "messages", None)):
        r = http.post(path, json=request_body(kind, huge, 2).body, headers=t.headers)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "context" in err["message"]
        if param is not None:
            assert (err["code"], err["param"]) == ("context_length_exceeded", param)


def test_big_body_is_prepared_off_the_event_loop(
        server: ThreadServer, http: Session, admin: Admin,
        monkeypatch: pytest.MonkeyPatch) -> None:
    t = admin.tenant()
    threads = _spy_render(server, monkeypatch)
    small = http.post(CHAT, json=request_body("chat", "hi", 2).body, headers=t.headers)
    assert small.status_code == 200, small.text
    big = http.post(CHAT, json=request_body("chat", "x" * 100_000, 2).body, headers=t.headers)
    assert big.status_code == 400, big.text  # longer than the demo model's context
    assert big.json()["error"]["code"] == "context_length_exceeded"
    loop_thread = threads[0]
    assert not loop_thread.startswith("kvgate-prepare")
    assert threads[1].startswith("kvgate-prepare")


@pytest.mark.parametrize("path, body", [
    ("/tokenize", {"model": "demo", "prompt": "hello"}),
    ("/detokenize", {"model": "demo", "tokens": [104, 105]}),
    ("/v1/messages/count_tokens",
     {"model": "demo", "messages": [{"role": "user", "content": "hello"}]}),
])
def test_unbilled_endpoints_keep_the_tenants_request_rate(
        server: ThreadServer, http: Session, admin: Admin, path: str, body: dict) -> None:
    """Not billed, but tokenizing is work: the tenant's request rate applies."""
    t = admin.tenant(requests_per_minute=2)
    body = {**body, "model": server.state.engine.model_id}
    assert [http.post(path, json=body, headers=t.headers).status_code
            for _ in range(2)] == [200, 200]
    r = http.post(path, json=body, headers=t.headers)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1


def test_one_request_cannot_take_every_running_slot(
        server: ThreadServer, http: Session, admin: Admin) -> None:
    t = admin.tenant()
    body = {"model": server.state.engine.model_id, "prompt": ["a", "b", "c", "d", "e"],
            "n": 16, "max_tokens": 4}
    assert server.settings.engine.max_running < 5 * 16
    r = http.post("/v1/completions", json=body, headers=t.headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
