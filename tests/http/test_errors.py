"""Bad inputs get the documented 4xx in the API's own error shape; the server keeps serving."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from testkit import ADMIN_KEY, Admin, Session, Tenant, ThreadServer, request_body

CHAT = "/v1/chat/completions"
MSGS = "/v1/messages"
GOOD_CHAT = request_body("chat", "hi", 2).body
GOOD_MSG = request_body("messages", "hi", 2).body


def chat(**kw: Any) -> dict:
    return {**GOOD_CHAT, **kw}


def msg(**kw: Any) -> dict:
    return {**GOOD_MSG, **kw}


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


# (id, method, path, json body or raw bytes, auth: tenant|admin|none|bad, status, code or None)
CASES: list[tuple[str, str, str, Any, str, int, str | None]] = [
    ("malformed-json", "POST", CHAT, b"{\"model\": ", "tenant", 400, "invalid_json"),
    ("body-not-object", "POST", CHAT, b"[1, 2]", "tenant", 400, "invalid_json"),
    ("missing-model", "POST", CHAT, without(GOOD_CHAT, "model"), "tenant", 400,
     "missing_field"),
    ("missing-messages", "POST", CHAT, without(GOOD_CHAT, "messages"), "tenant", 400,
     "missing_field"),
    ("messages-wrong-type", "POST", CHAT, chat(messages="hi"), "tenant", 400, "invalid_type"),
    ("max-tokens-string", "POST", CHAT, chat(max_tokens="10"), "tenant", 400, "invalid_type"),
    ("max-tokens-bool", "POST", CHAT, chat(max_tokens=True), "tenant", 400, "invalid_type"),
    ("empty-messages", "POST", CHAT, chat(messages=[]), "tenant", 400, "empty_messages"),
    ("message-not-object", "POST", CHAT, chat(messages=["hi"]), "tenant", 400, "invalid_type"),
    ("bad-role", "POST", CHAT, chat(messages=[{"role": "tool", "content": "x"}]), "tenant",
     400, "invalid_value"),
    ("image-part", "POST", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]), "tenant", 400,
     "unsupported_content"),
    ("negative-max-tokens", "POST", CHAT, chat(max_tokens=-5), "tenant", 400, "invalid_value"),
    ("zero-max-tokens", "POST", CHAT, chat(max_tokens=0), "tenant", 400, "invalid_value"),
    ("huge-max-tokens", "POST", CHAT, chat(max_tokens=10**9), "tenant", 400,
     "context_length_exceeded"),
    ("prompt-too-long", "POST", CHAT, chat(messages=[{"role": "user", "content": "x" * 9000}]),
     "tenant", 400, "context_length_exceeded"),
    ("temperature-range", "POST", CHAT, chat(temperature=5), "tenant", 400, "invalid_value"),
    ("seed-over-int64", "POST", CHAT, chat(seed=2**63), "tenant", 400, "invalid_value"),
    ("seed-under-int64", "POST", CHAT, chat(seed=-(2**63) - 1), "tenant", 400,
     "invalid_value"),
    ("top-p-range", "POST", CHAT, chat(top_p=1.5), "tenant", 400, "invalid_value"),
    ("n-too-many", "POST", CHAT, chat(n=1000), "tenant", 400, "invalid_value"),
    ("beam-search", "POST", CHAT, chat(use_beam_search=True), "tenant", 400,
     "unsupported_parameter"),
    ("tools", "POST", CHAT, chat(tools=[{"type": "code_interpreter"}]),
     "tenant", 400, "invalid_value"),
    ("legacy-functions", "POST", CHAT, chat(functions=[{"name": "f"}]),
     "tenant", 400, "unsupported_parameter"),
    ("reasoning-effort", "POST", CHAT, chat(reasoning_effort="high"),
     "tenant", 400, "unsupported_parameter"),
    ("web-search-empty", "POST", CHAT, chat(web_search_options={}),
     "tenant", 400, "unsupported_parameter"),
    ("bad-response-format", "POST", CHAT, chat(response_format={"type": "yaml"}), "tenant",
     400, "invalid_value"),
    ("unknown-model", "POST", CHAT, chat(model="gpt-4o"), "tenant", 404, "model_not_found"),
    ("completion-no-prompt", "POST", "/v1/completions", without(GOOD_CHAT, "messages"),
     "tenant", 400, "missing_field"),
    ("huge-body", "POST", CHAT, chat(messages=[{"role": "user", "content": "x" * 300_000}]),
     "tenant", 413, "request_too_large"),
    ("no-key", "POST", CHAT, GOOD_CHAT, "none", 401, "missing_api_key"),
    ("bad-key", "POST", CHAT, GOOD_CHAT, "bad", 401, "invalid_api_key"),
    ("unknown-route", "GET", "/v1/nope", None, "tenant", 404, "not_found"),
    ("wrong-method", "GET", CHAT, None, "tenant", 405, "method_not_allowed"),
    ("tenant-key-on-admin", "GET", "/admin/tenants", None, "tenant", 403, "admin_only"),
    ("no-key-on-admin", "GET", "/admin/usage", None, "none", 401, "missing_api_key"),
    ("admin-bad-group-by", "GET", "/admin/usage?group_by=week", None, "admin", 400, None),
    ("admin-unknown-tenant", "GET", "/admin/tenants/999999", None, "admin", 404, "not_found"),
    ("admin-key-on-v1", "POST", CHAT, GOOD_CHAT, "admin", 403, "no_tenant"),
    # Anthropic shape
    ("msg-malformed-json", "POST", MSGS, b"{", "tenant", 400, None),
    ("msg-missing-max-tokens", "POST", MSGS, without(GOOD_MSG, "max_tokens"), "tenant", 400,
     None),
    ("msg-empty-messages", "POST", MSGS, msg(messages=[]), "tenant", 400, None),
    ("msg-system-role", "POST", MSGS, msg(messages=[{"role": "system", "content": "x"}]),
     "tenant", 400, None),
    ("msg-image-block", "POST", MSGS, msg(messages=[{"role": "user", "content": [
        {"type": "image", "source": {}}]}]), "tenant", 400, None),
    ("msg-bad-ttl", "POST", MSGS, msg(cache_control={"type": "ephemeral", "ttl": "2h"}),
     "tenant", 400, None),
    ("msg-negative-max-tokens", "POST", MSGS, msg(max_tokens=-1), "tenant", 400, None),
    ("msg-unknown-model", "POST", MSGS, msg(model="claude-x"), "tenant", 404, None),
    ("msg-bad-key", "POST", MSGS, GOOD_MSG, "bad", 401, None),
    ("msg-huge-body", "POST", MSGS, msg(system="y" * 300_000), "tenant", 413, None),
]


@pytest.fixture(scope="module")
def victim(admin: Admin) -> Tenant:
    return admin.tenant()


def _headers(auth: str, tenant: Tenant) -> dict[str, str]:
    return {"tenant": {"Authorization": f"Bearer {tenant.key}"},
            "admin": {"Authorization": f"Bearer {ADMIN_KEY}"},
            "bad": {"Authorization": "Bearer kvg_not_a_real_key"},
            "none": {}}[auth]


def check_shape(path: str, body: dict, status: int, code: str | None) -> None:
    if path.startswith(MSGS):
        assert body["type"] == "error"
        assert isinstance(body["error"]["type"], str) and body["error"]["message"]
        expected = {400: "invalid_request_error", 401: "authentication_error",
                    404: "not_found_error", 413: "request_too_large"}[status]
        assert body["error"]["type"] == expected
    else:
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["message"]
        if code is not None:
            assert err["code"] == code


@pytest.mark.parametrize(("name", "method", "path", "payload", "auth", "status", "code"), CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input(http: Session, victim: Tenant, model_id: str, name: str, method: str,
                   path: str, payload: Any, auth: str, status: int, code: str | None) -> None:
    headers = _headers(auth, victim)
    if isinstance(payload, bytes):
        headers["Content-Type"] = "application/json"
        r = http.request(method, path, data=payload, headers=headers)
    else:
        r = http.request(method, path, json=payload, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["x-request-id"]
    check_shape(path, r.json(), status, code)
    assert http.get("/healthz").status_code == 200


def test_revoked_key_and_server_still_serves(http: Session, admin: Admin) -> None:
    t = admin.tenant()
    auth = {"Authorization": f"Bearer {t.key}"}
    assert http.post(CHAT, json=GOOD_CHAT, headers=auth).status_code == 200
    assert admin.http.delete(f"/admin/keys/{t.key_id}").status_code == 200
    r = http.post(CHAT, json=GOOD_CHAT, headers=auth)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_unexpected_exception_is_500_and_logged(server: ThreadServer, http: Session,
                                                victim: Tenant,
                                                monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    engine = server.state.engine

    def boom(messages: list) -> list[int]:
        raise RuntimeError("injected failure")

    monkeypatch.setattr(engine, "render_chat", boom)
    auth = {"Authorization": f"Bearer {victim.key}"}
    r = http.post(CHAT, json=GOOD_CHAT, headers=auth)
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    assert r.headers["x-request-id"] in r.json()["error"]["message"]
    r = http.post(MSGS, json=GOOD_MSG, headers={"x-api-key": victim.key})
    assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"
    assert any("injected failure" in (rec.exc_text or "") or rec.exc_info
               for rec in caplog.records)
    monkeypatch.undo()
    assert http.post(CHAT, json=GOOD_CHAT, headers=auth).status_code == 200


def _limited(admin: Admin, **limits: int) -> Callable[[Session], Any]:
    t = admin.tenant(**limits)
    return lambda http: http.post(CHAT, json=GOOD_CHAT,
                                  headers={"Authorization": f"Bearer {t.key}"})


def test_requests_per_minute_429(http: Session, admin: Admin) -> None:
    send = _limited(admin, requests_per_minute=2)
    assert [send(http).status_code for _ in range(2)] == [200, 200]
    r = send(http)
    assert r.status_code == 429
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert r.json()["error"]["code"] == "rate_limit_exceeded"


def test_tokens_per_minute_429(http: Session, admin: Admin) -> None:
    send = _limited(admin, tokens_per_minute=60)
    replies = [send(http) for _ in range(10)]  # a few fit in the minute, then 429s
    assert replies[0].status_code == 200
    r = replies[-1]
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["code"] == "rate_limit_exceeded"


def test_a_prompt_over_the_whole_tokens_per_minute_limit_is_400(http: Session,
                                                                admin: Admin) -> None:
    send = _limited(admin, tokens_per_minute=5)  # the chat template alone is more
    r = send(http)
    assert r.status_code == 400 and "Retry-After" not in r.headers  # no wait admits it


def test_engine_failure_midway_is_500_and_billed_once(server: ThreadServer, http: Session,
                                                      admin: Admin,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from kvgate.gateway.engine import TokenEvent

    async def failing(request: Any) -> Any:
        yield TokenEvent("x", [120])
        raise RuntimeError("device lost")

    monkeypatch.setattr(server.state.engine, "generate", failing)
    t = admin.tenant()
    r = http.post(CHAT, json=GOOD_CHAT, headers={"Authorization": f"Bearer {t.key}"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    totals = admin.usage(t.id)
    assert totals["requests"] == 1 and totals["completion_tokens"] == 1
