"""Admission comes before work: a tenant over its request rate is turned away before its
body is parsed, rendered or tokenized, and counted; a big body is prepared on a worker
thread, not on the event loop."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import Admin, Session, ThreadServer, request_body

CHAT = "/v1/chat/completions"


def _spy_render(server: ThreadServer, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the threads ``render_chat`` ran on, one per call."""
    engine = server.state.engine
    real: Callable[[list[dict[str, Any]]], list[int]] = engine.render_chat
    threads: list[str] = []

    def spy(messages: list[dict[str, Any]]) -> list[int]:
        threads.append(threading.current_thread().name)
        return real(messages)

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


def test_tokens_per_minute_still_checked_after_tokenizing(
        server: ThreadServer, http: Session, admin: Admin) -> None:
    t = admin.tenant(tokens_per_minute=5)
    r = http.post(CHAT, json=request_body("chat", "hi", 2).body, headers=t.headers)
    assert r.status_code == 429, r.text
    assert _rejected(server, "tokens_per_minute", t.id) == 1


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
