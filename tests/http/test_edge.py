"""Hostile input at the edge: each case once returned a 500 and now gets a 4xx in the API's
error shape. Lone surrogates and deep nesting are refused by the JSON loader (every body,
every field); ids and integers are bounded to what the database holds, on SQLite here and
on PostgreSQL in ``test_admin_integers_on_postgres``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from testkit import ADMIN_KEY, MiB, Session, Tenant, ThreadServer, request_body
from tests.pg import pg_url  # noqa: F401  (a fixture)

CHAT = "/v1/chat/completions"
MSGS = "/v1/messages"
GOOD_CHAT = request_body("chat", "hi", 2).body
GOOD_MSG = request_body("messages", "hi", 2).body
GOOD_COMPLETION = request_body("completions", "hi", 2).body
LONE = "\ud800"  # json.dumps writes it as the escape "\ud800"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _post(http: Session, path: str, body: Any, headers: dict[str, str]) -> requests.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, data=raw, headers={**headers, "Content-Type": "application/json"})


def assert_client_error(r: requests.Response, path: str, status: int = 400) -> dict:
    """The status, and the error shape of the API the path belongs to."""
    assert r.status_code == status, r.text
    body = r.json()
    if path.startswith(MSGS):
        assert body["type"] == "error" and body["error"]["message"]
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["message"]
    return body


SURROGATE_CASES = [
    ("chat-content", CHAT, {**GOOD_CHAT, "messages": [{"role": "user", "content": LONE}]}),
    ("chat-system", CHAT, {**GOOD_CHAT, "messages": [{"role": "system", "content": "a" + LONE},
                                                    {"role": "user", "content": "hi"}]}),
    ("chat-text-part", CHAT, {**GOOD_CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": LONE}]}]}),
    ("chat-stop", CHAT, {**GOOD_CHAT, "stop": [LONE]}),
    ("chat-key", CHAT, {**GOOD_CHAT, LONE: 1}),
    ("completion-prompt", "/v1/completions", {**GOOD_COMPLETION, "prompt": LONE}),
    ("messages-system", MSGS, {**GOOD_MSG, "system": LONE}),
    ("messages-block", MSGS, {**GOOD_MSG, "messages": [{"role": "user", "content": [
        {"type": "text", "text": LONE}]}]}),
    ("messages-stop", MSGS, {**GOOD_MSG, "stop_sequences": [LONE]}),
    ("admin-tenant-name", "/admin/tenants", {"name": LONE}),
    ("admin-plan-name", "/admin/tenants", {"name": "surrogate-plan", "plan": LONE}),
]


@pytest.mark.parametrize(("path", "body"), [c[1:] for c in SURROGATE_CASES],
                         ids=[c[0] for c in SURROGATE_CASES])
def test_lone_surrogate_is_a_400(http: Session, tenant: Tenant, path: str, body: Any) -> None:
    headers = ADMIN if path.startswith("/admin") else tenant.headers
    raw = json.dumps(body).encode()
    assert b"\\ud800" in raw
    r = _post(http, path, raw, headers)
    err = assert_client_error(r, path)
    if not path.startswith(MSGS):
        assert err["error"]["code"] == "invalid_json"
    # the same code point sent as (invalid) UTF-8 bytes rather than as an escape
    r = _post(http, path, raw.replace(b"\\ud800", "\ud800".encode("utf-8", "surrogatepass")),
              headers)
    assert_client_error(r, path)


def test_a_valid_surrogate_pair_is_text(http: Session, tenant: Tenant) -> None:
    body = {**GOOD_CHAT, "messages": [{"role": "user", "content": "\ud83d\ude00"}]}
    r = _post(http, CHAT, json.dumps(body).encode(), tenant.headers)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", [CHAT, "/v1/completions", MSGS, "/admin/tenants"])
@pytest.mark.parametrize("opener", ["[", "{\"\":"])
def test_json_nested_100k_deep_is_a_400(http: Session, tenant: Tenant, path: str,
                                        opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    depth = 100_000 if opener == "[" else 40_000  # within the test server's body limit
    raw = ("{\"x\": " + opener * depth + "1" + closer * depth + "}").encode()
    headers = ADMIN if path.startswith("/admin") else tenant.headers
    assert_client_error(_post(http, path, raw, headers), path)
    assert http.get("/healthz").status_code == 200


@pytest.mark.parametrize("where", ["top", "system", "block"])
@pytest.mark.parametrize("ttl", [[], {}, ["5m"], 5])
def test_unhashable_or_odd_ttl_is_a_400(http: Session, tenant: Tenant, where: str,
                                        ttl: Any) -> None:
    cc = {"type": "ephemeral", "ttl": ttl}
    block = {"type": "text", "text": "hi", "cache_control": cc}
    body = {"top": {**GOOD_MSG, "cache_control": cc},
            "system": {**GOOD_MSG, "system": [block]},
            "block": {**GOOD_MSG, "messages": [{"role": "user", "content": [block]}]}}[where]
    assert_client_error(_post(http, MSGS, body, tenant.headers), MSGS)


@pytest.mark.parametrize("token", ["vocab", 2**32, 2**32 + 5, 2**63, 2**64, -1])
def test_completion_token_id_out_of_vocabulary_is_a_400(
        server: ThreadServer, http: Session, tenant: Tenant, token: Any) -> None:
    vocab = server.state.engine.tokenizer.vocab_size
    tid = vocab if token == "vocab" else token
    for prompt in ([1, 2, tid], [[tid, 3]]):
        body = {**GOOD_COMPLETION, "prompt": prompt}
        err = assert_client_error(_post(http, "/v1/completions", body, tenant.headers),
                                  "/v1/completions")
        assert err["error"]["param"] == "prompt"


def test_completion_last_token_id_of_the_vocabulary_is_served(
        server: ThreadServer, http: Session, tenant: Tenant) -> None:
    vocab = server.state.engine.tokenizer.vocab_size
    body = {**GOOD_COMPLETION, "prompt": [1, 2, vocab - 1]}
    r = _post(http, "/v1/completions", body, tenant.headers)
    assert r.status_code == 200, r.text


# -- admin: ids, integers, plans -------------------------------------------------------------

BAD_IDS = ["abc", "²", "٣", "1.5", "-1", "9223372036854775808", "18446744073709551616",
           "2147483648", "0x10", " 1"]


def admin_id_cases(http: Session) -> list[tuple[str, str, Any]]:
    """(method, path, json) for every admin route that takes an id, with each bad id."""
    out: list[tuple[str, str, Any]] = []
    for raw in BAD_IDS:
        q = requests.utils.quote(raw)
        out += [("GET", f"/admin/tenants/{q}", None), ("PATCH", f"/admin/tenants/{q}",
                                                        {"status": "active"}),
                ("DELETE", f"/admin/tenants/{q}", None),
                ("POST", f"/admin/tenants/{q}/keys", None),
                ("GET", f"/admin/tenants/{q}/keys", None), ("DELETE", f"/admin/keys/{q}", None),
                ("GET", f"/admin/usage?tenant_id={q}", None),
                ("DELETE", f"/admin/cache?tenant_id={q}", None)]
    return out


BAD_FIELDS: list[dict[str, Any]] = [
    *({name: value} for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent",
                                 "cache_ttl_seconds", "cache_quota_bytes")
      for value in (2**63, 2**64, 10**30, -1)),
    *({name: 2**31} for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent",
                                 "cache_ttl_seconds")),
    {"plan": "²"}, {"plan": "٣"}, {"plan": "9223372036854775808"}, {"plan": 2**63},
    {"plan": 2**31}, {"plan": -1}, {"plan": "a\x00b"}, {"name": "nul\x00name"},
    {"name": "line\nbreak"}, {"status": "act\x00ive"}, {"plan": []}, {"name": ["x"]},
]


def check_admin_edges(url: str) -> None:
    """Every bad id on every admin route and every bad tenant field, create and update:
    a 4xx in the OpenAI error shape, never a 500."""
    http = Session(url, ADMIN)
    try:
        tenant = http.post("/admin/tenants", json={"name": "edge-target"})
        assert tenant.status_code == 201, tenant.text
        tid = tenant.json()["id"]
        for method, path, body in admin_id_cases(http):
            r = http.request(method, path, json=body)
            assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text)
            assert_client_error(r, path, r.status_code)
        for i, fields in enumerate(BAD_FIELDS):
            r = http.post("/admin/tenants", json={"name": f"edge-{i}", **fields})
            assert_client_error(r, "/admin/tenants", 400)
            r = http.patch(f"/admin/tenants/{tid}", json=fields)
            assert_client_error(r, "/admin/tenants", 400)
        # the largest values that fit are accepted
        r = http.patch(f"/admin/tenants/{tid}", json={
            "requests_per_minute": 2**31 - 1, "cache_quota_bytes": 2**63 - 1})
        assert r.status_code == 200, r.text
        assert r.json()["cache_quota_bytes"] == 2**63 - 1
    finally:
        http.close()


def test_admin_ids_and_integers_on_sqlite(server: ThreadServer) -> None:
    check_admin_edges(server.url)


def test_admin_integers_on_postgres(pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    migrate = subprocess.run([sys.executable, "-m", "kvgate.gateway.cli", "migrate", "--db", pg_url],
                             capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0, migrate.stderr
    with ThreadServer(tmp_path, db=pg_url, device="cpu", device_cache_bytes=16 * MiB,
                      host_cache_bytes=16 * MiB) as srv:
        check_admin_edges(srv.url)
