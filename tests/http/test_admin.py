"""Admin API, usage totals against what clients saw, cache stats and flush, disconnects."""

from __future__ import annotations

import socket
import time

import anthropic
import openai

from testkit import Admin, Session, Tenant, ThreadServer

SYSTEM = "Shared instructions long enough to fill a few cache blocks of the prefix cache. " * 2


def test_tenant_crud_and_keys(admin: Admin, http: Session, model_id: str) -> None:
    r = admin.http.post("/admin/tenants", json={"name": "crud-co", "cache_ttl_seconds": 600,
                                               "cache_quota_bytes": 1 << 20})
    assert r.status_code == 201, r.text
    tid = r.json()["id"]
    assert r.json()["cache_quota_bytes"] == 1 << 20
    assert admin.http.post("/admin/tenants", json={"name": "crud-co"}).status_code == 409
    assert admin.http.post("/admin/tenants", json={"name": 5}).status_code == 400
    assert any(t["id"] == tid for t in admin.http.get("/admin/tenants").json()["data"])
    assert admin.http.get(f"/admin/tenants/{tid}").json()["name"] == "crud-co"
    r = admin.http.patch(f"/admin/tenants/{tid}", json={"requests_per_minute": 100})
    assert r.status_code == 200 and r.json()["requests_per_minute"] == 100
    k = admin.http.post(f"/admin/tenants/{tid}/keys")
    assert k.status_code == 201 and k.json()["key"].startswith("kvg_")
    listed = admin.http.get(f"/admin/tenants/{tid}/keys").json()["data"]
    assert [x["id"] for x in listed] == [k.json()["id"]]
    assert "key" not in listed[0]  # shown once, at creation only
    auth = {"Authorization": f"Bearer {k.json()['key']}"}
    body = {"model": model_id, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}
    assert http.post("/v1/chat/completions", json=body, headers=auth).status_code == 200
    assert admin.http.delete(f"/admin/tenants/{tid}").status_code == 200
    assert http.post("/v1/chat/completions", json=body, headers=auth).status_code == 401


def test_usage_totals_equal_what_clients_saw(server: ThreadServer, admin: Admin,
                                             model_id: str) -> None:
    t = admin.tenant()
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key=t.key, max_retries=0)
    an = anthropic.Anthropic(base_url=server.url, api_key=t.key, max_retries=0)
    seen = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0}
    writes_seen = 0

    def add(prompt: int, cached: int, completion: int) -> None:
        seen["requests"] += 1
        seen["prompt_tokens"] += prompt
        seen["cached_tokens"] += cached
        seen["completion_tokens"] += completion

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "q"}]
    for _ in range(2):
        u = oa.chat.completions.create(model=model_id, messages=messages, max_tokens=3).usage
        add(u.prompt_tokens, u.prompt_tokens_details.cached_tokens, u.completion_tokens)
    chunks = list(oa.chat.completions.create(model=model_id, messages=messages, max_tokens=3,
                                             stream=True,
                                             stream_options={"include_usage": True}))
    u = chunks[-1].usage
    add(u.prompt_tokens, u.prompt_tokens_details.cached_tokens, u.completion_tokens)
    u = oa.completions.create(model=model_id, prompt=SYSTEM, max_tokens=2).usage
    add(u.prompt_tokens, u.prompt_tokens_details.cached_tokens, u.completion_tokens)
    req = {"model": model_id, "max_tokens": 3, "system": [
        {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "messages": [{"role": "user", "content": "anthropic"}]}
    m = an.messages.create(**req).usage
    with an.messages.stream(**req) as stream:
        s = stream.get_final_message().usage
    for x in (m, s):
        add(x.input_tokens + x.cache_read_input_tokens + x.cache_creation_input_tokens,
            x.cache_read_input_tokens, x.output_tokens)
        writes_seen += x.cache_creation_input_tokens

    totals = admin.usage(t.id)
    for name, value in seen.items():
        assert totals[name] == value, (name, totals, seen)
    # OpenAI responses do not show cache writes; the Anthropic ones are a lower bound.
    assert totals["cache_write_tokens"] >= writes_seen
    assert totals["cache_write_tokens"] > 0  # the first request wrote the shared prefix
    assert isinstance(totals["cost_micros"], int)


def test_cache_stats_and_flush(server: ThreadServer, admin: Admin, tenant: Tenant,
                               http: Session, model_id: str) -> None:
    auth = {"Authorization": f"Bearer {tenant.key}"}
    body = {"model": model_id, "max_tokens": 1,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "s"}]}
    assert http.post("/v1/chat/completions", json=body, headers=auth).status_code == 200
    stats = admin.http.get("/admin/cache/stats").json()
    for tier in ("device", "host"):
        assert {"capacity_bytes", "used_bytes", "capacity_pages", "used_pages",
                "blocks"} <= set(stats[tier])
    assert set(stats["evictions"]) == {"lru", "ttl", "quota"}
    mine = [x for x in stats["tenants"] if x["tenant_id"] == tenant.id]
    assert mine and mine[0]["tenant_name"] == tenant.name and mine[0]["cached_bytes"] > 0
    r = admin.http.delete("/admin/cache", params={"tenant_id": tenant.id})
    assert r.status_code == 200 and r.json()["flushed_blocks"] > 0
    again = http.post("/v1/chat/completions", json=body, headers=auth).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert admin.http.delete("/admin/cache").status_code == 400


def test_client_disconnect_cancels_and_bills(server: ThreadServer, admin: Admin,
                                             model_id: str) -> None:
    """A streaming client that hangs up mid-way: the engine request is cancelled and the
    ledger bills the tokens produced so far, once."""
    t = admin.tenant()
    max_tokens = 2000
    payload = (b'{"model": "%s", "max_tokens": %d, "stream": true, "messages": '
               b'[{"role": "user", "content": "go on"}]}' % (model_id.encode(), max_tokens))
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t.key}"
            f"\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(head.encode() + payload)
        received = b""
        while received.count(b"data: ") < 4:
            chunk = sock.recv(4096)
            assert chunk, "server closed the stream early"
            received += chunk
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        totals = admin.usage(t.id)
        if totals["requests"]:
            break
        time.sleep(0.1)
    assert totals["requests"] == 1
    assert 1 <= totals["completion_tokens"] < max_tokens
    assert server.state.engine.num_running() == 0 or totals["completion_tokens"] < max_tokens
