"""Explicit caches (``/v1/caches``): made, named with ``cached_content`` through the
official SDKs, listed and deleted per tenant, bounded, billed per token-hour and swept
when they expire (a server of its own that bills every second)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import openai
import pytest

from kvgate.gateway.ledger import cost_micros
from kvgate.gateway.ledger.billing import DEFAULT_PRICES
from kvgate.gateway.usage import Usage
from testkit import MiB, Session, Tenant, ThreadServer

SYSTEM = "You answer questions about the kvgate handbook below. " + "Rule of the house. " * 12


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    with ThreadServer(tmp_path_factory.mktemp("caches"), device="cpu",
                      device_cache_bytes=16 * MiB, host_cache_bytes=4 * MiB,
                      reservation_bill_interval_s=1) as srv:
        yield srv


def _http(server: ThreadServer, tenant: Tenant) -> Session:
    return Session(server.url, tenant.headers)


def _create(server: ThreadServer, tenant: Tenant, **body: Any) -> dict[str, Any]:
    body.setdefault("messages", [{"role": "system", "content": SYSTEM}])
    with _http(server, tenant) as http:
        r = http.post("/v1/caches", json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def _oai(server: ThreadServer, tenant: Tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=tenant.key, max_retries=0)


def _pinned(server: ThreadServer, tenant: Tenant) -> int:
    return server.on_loop(server.state.engine.pinned_blocks(f"tenant:{tenant.id}"))


def _block(server: ThreadServer) -> int:
    return server.state.settings.cache.block_size


def _until(check: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_a_named_cache_is_read_and_another_tenant_gets_404(server: ThreadServer) -> None:
    owner, other = server.admin.tenant(), server.admin.tenant()
    cache = _create(server, owner, ttl="600s", display_name="handbook")
    assert cache["object"] == "cache" and cache["id"].startswith("cache_")
    assert cache["display_name"] == "handbook" and cache["ttl_seconds"] == 600
    assert cache["expires_at"] - cache["created_at"] == 600
    assert cache["model"] == server.state.engine.model_id
    full = cache["tokens"] // _block(server) * _block(server)
    assert full > 0 and _pinned(server, owner) == full // _block(server)
    # the prefill was billed as a request of its own
    rows = [r for r in server.ledger_rows(owner.id).values() if r["endpoint"] == "caches"]
    assert len(rows) == 1 and rows[0]["prompt_tokens"] == cache["tokens"], rows
    assert cache["usage"]["prompt_tokens"] == cache["tokens"]

    answer = _oai(server, owner).chat.completions.create(
        model=cache["model"], max_tokens=1, messages=[{"role": "user", "content": "Hi?"}],
        extra_body={"cached_content": cache["id"]})
    assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens >= full

    # Another tenant: the same id is unknown, and the same text hits nothing of the owner's
    with pytest.raises(openai.NotFoundError) as err:
        _oai(server, other).chat.completions.create(
            model=cache["model"], max_tokens=1, messages=[{"role": "user", "content": "Hi?"}],
            extra_body={"cached_content": cache["id"]})
    assert cache["id"] in str(err.value)
    same = _oai(server, other).chat.completions.create(
        model=cache["model"], max_tokens=1, messages=[
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi?"}])
    assert same.usage is not None and same.usage.prompt_tokens_details is not None
    assert same.usage.prompt_tokens_details.cached_tokens == 0
    with _http(server, other) as http:
        assert http.get(f"/v1/caches/{cache['id']}").status_code == 404
        assert http.delete(f"/v1/caches/{cache['id']}").status_code == 404
        assert http.patch(f"/v1/caches/{cache['id']}", json={"ttl": "60s"}).status_code == 404
        assert http.get("/v1/caches").json()["data"] == []
    assert _pinned(server, owner) == full // _block(server)


def test_the_responses_api_names_it_too(server: ThreadServer) -> None:
    owner, other = server.admin.tenant(), server.admin.tenant()
    cache = _create(server, owner)
    full = cache["tokens"] // _block(server) * _block(server)
    client = _oai(server, owner)
    r = client.responses.create(model=cache["model"], max_output_tokens=1, input="Hi?",
                                extra_body={"cached_content": cache["id"]})
    assert r.usage is not None and r.usage.input_tokens_details.cached_tokens >= full
    for extra in ({"instructions": "Be brief."}, {"previous_response_id": r.id}):
        with pytest.raises(openai.BadRequestError):
            client.responses.create(model=cache["model"], max_output_tokens=1, input="Hi?",
                                    extra_body={"cached_content": cache["id"]}, **extra)
    with pytest.raises(openai.NotFoundError):
        _oai(server, other).responses.create(model=cache["model"], max_output_tokens=1,
                                             input="Hi?",
                                             extra_body={"cached_content": cache["id"]})


def test_the_anthropic_shape_and_messages_naming_it(server: ThreadServer) -> None:
    tenant = server.admin.tenant()
    cache = _create(server, tenant, system=SYSTEM, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Remember the handbook."}]},
        {"role": "assistant", "content": "I will."}], ttl_seconds=300)
    client = anthropic.Anthropic(base_url=server.url, api_key=tenant.key, max_retries=0)
    msg = client.messages.create(model=cache["model"], max_tokens=1,
                                 messages=[{"role": "user", "content": "Rule one?"}],
                                 extra_body={"cached_content": cache["id"]})
    full = cache["tokens"] // _block(server) * _block(server)
    assert (msg.usage.cache_read_input_tokens or 0) >= full
    # a system prompt of the request's own would follow the cache's turns: refused
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=cache["model"], max_tokens=1, system="Other.",
                               messages=[{"role": "user", "content": "Rule one?"}],
                               extra_body={"cached_content": cache["id"]})
    # named from the OpenAI route too: text turns convert
    answer = _oai(server, tenant).chat.completions.create(
        model=cache["model"], max_tokens=1, messages=[{"role": "user", "content": "Rule?"}],
        extra_body={"cached_content": cache["id"]})
    assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens >= full
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model=cache["model"], max_tokens=1,
                               messages=[{"role": "user", "content": "Rule one?"}],
                               extra_body={"cached_content": "cache_" + "x" * 32})


def test_list_get_patch_delete_and_unpinned_after_delete(server: ThreadServer) -> None:
    tenant = server.admin.tenant()
    a = _create(server, tenant, ttl="120s")
    b = _create(server, tenant, messages=[{"role": "system", "content": "Other. " * 30}])
    with _http(server, tenant) as http:
        listed = http.get("/v1/caches").json()
        assert listed["object"] == "list"
        assert [c["id"] for c in listed["data"]] == [a["id"], b["id"]]
        assert b["ttl_seconds"] == 300  # the tenant's default TTL
        # the operator sees the same list (never the text); a tenant key may not ask
        admin_view = server.admin.http.get("/admin/caches", params={"tenant_id": tenant.id})
        assert [c["id"] for c in admin_view.json()["data"]] == [a["id"], b["id"]]
        assert all("prefix" not in c and "messages" not in c for c in admin_view.json()["data"])
        assert http.get("/admin/caches", params={"tenant_id": tenant.id}).status_code == 403
        got = http.get(f"/v1/caches/{a['id']}").json()
        assert {k: got[k] for k in ("id", "tokens", "expires_at")} == {
            k: a[k] for k in ("id", "tokens", "expires_at")}
        patched = http.patch(f"/v1/caches/{a['id']}", json={"ttl_seconds": 900}).json()
        assert patched["ttl_seconds"] == 900 and patched["expires_at"] > a["expires_at"]
        before = _pinned(server, tenant)
        r = http.delete(f"/v1/caches/{a['id']}")
        assert r.status_code == 200 and r.json()["deleted"] is True, r.text
        assert _pinned(server, tenant) < before
        assert http.get(f"/v1/caches/{a['id']}").status_code == 404
        assert [c["id"] for c in http.get("/v1/caches").json()["data"]] == [b["id"]]
        r = http.delete(f"/v1/caches/{b['id']}")
        assert r.status_code == 200
    assert _pinned(server, tenant) == 0  # evictable again: nothing of the tenant's is pinned
    with pytest.raises(openai.NotFoundError):
        _oai(server, tenant).chat.completions.create(
            model=a["model"], max_tokens=1, messages=[{"role": "user", "content": "Hi"}],
            extra_body={"cached_content": a["id"]})


def test_ttl_over_the_tenants_maximum_and_the_budget(server: ThreadServer) -> None:
    tenant = server.admin.tenant(cache_max_ttl_seconds=600)
    with _http(server, tenant) as http:
        r = http.post("/v1/caches", json={"messages": [{"role": "system", "content": SYSTEM}],
                                          "ttl": "601s"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "ttl", r.text
    stats = server.admin.cache_stats()["device"]
    page = stats["capacity_bytes"] // stats["capacity_pages"]
    tokens = _create(server, server.admin.tenant())["tokens"]
    pages = -(-tokens * 3 // 2) // _block(server)  # room for one and a half
    small = server.admin.tenant(cache_quota_bytes=pages * page)
    cache = _create(server, small)
    with _http(server, small) as http:
        r = http.post("/v1/caches", json={"messages": [{"role": "system", "content": SYSTEM}]})
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        left = pages * _block(server) - cache["tokens"]
        assert err["code"] == "cache_budget_exceeded" and f"{left} are left" in err["message"]
        assert len(http.get("/v1/caches").json()["data"]) == 1
    # nothing was computed (or billed) for the refused one
    assert len([r for r in server.ledger_rows(small.id).values()
                if r["endpoint"] == "caches"]) == 1


def test_storage_is_billed_per_token_hour(server: ThreadServer) -> None:
    tenant = server.admin.tenant()
    cache = _create(server, tenant, ttl="600s")

    def rows() -> list[dict[str, Any]]:
        return [r for r in server.ledger_rows(tenant.id).values()
                if r["endpoint"] == "cache.storage"]

    assert _until(lambda: len(rows()) >= 2)
    for r in rows():
        assert r["n"] == 1 and r["prompt_tokens"] == 0 and r["completion_tokens"] == 0
        assert 0 < r["stored_token_seconds"] <= cache["tokens"]
        assert r["request_id"].startswith(f"storage-{cache['id']}-")
        assert r["cost_micros"] == cost_micros(
            Usage(stored_token_seconds=r["stored_token_seconds"]), DEFAULT_PRICES)
    usage = server.admin.usage(tenant.id)
    assert usage["stored_token_seconds"] >= sum(r["stored_token_seconds"] for r in rows()) > 0
    assert usage["requests"] == 1  # the prefill; storage rows are not requests


def test_expired_caches_are_swept(server: ThreadServer) -> None:
    tenant = server.admin.tenant()
    cache = _create(server, tenant, ttl="1s")
    assert _pinned(server, tenant) > 0
    assert _until(lambda: _pinned(server, tenant) == 0)
    with _http(server, tenant) as http:
        assert http.get(f"/v1/caches/{cache['id']}").status_code == 404
        assert http.get("/v1/caches").json()["data"] == []


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "system", "content": SYSTEM}], "ttl": "1h"},
    {"messages": [{"role": "system", "content": SYSTEM}], "ttl": "-5s"},
    {"messages": [{"role": "system", "content": SYSTEM}], "ttl": "3600"},
    {"messages": [{"role": "system", "content": SYSTEM}], "ttl": "9" * 40 + "s"},
    {"messages": [{"role": "system", "content": SYSTEM}], "ttl": 3600},
    {"messages": [{"role": "system", "content": SYSTEM}], "ttl_seconds": "3600"},
    {"messages": [{"role": "system", "content": SYSTEM}], "ttl_seconds": 0},
    {"messages": [{"role": "system", "content": SYSTEM}], "ttl_seconds": True},
    {"messages": [{"role": "system", "content": SYSTEM}], "ttl": "60s", "ttl_seconds": 60},
    {"messages": [{"role": "system", "content": SYSTEM}], "display_name": "x" * 500},
    {"messages": [{"role": "system", "content": SYSTEM}], "display_name": "a\x00b"},
    {"messages": [{"role": "system", "content": SYSTEM}], "nope": 1},
    {"messages": [{"role": "system", "content": "too short"}]},
    {"messages": []},
    {"messages": "text"},
    {},
    {"messages": [{"role": "system", "content": SYSTEM}], "model": "another-model"},
])
def test_hostile_create_bodies(server: ThreadServer, body: dict[str, Any]) -> None:
    tenant = server.admin.tenant()
    with _http(server, tenant) as http:
        r = http.post("/v1/caches", json=body)
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
        assert "error" in r.json() and "message" in r.json()["error"]
        assert http.get("/v1/caches").json()["data"] == []


def test_hostile_ids_and_huge_bodies(server: ThreadServer) -> None:
    tenant = server.admin.tenant()
    with _http(server, tenant) as http:
        for cid in ("cache_%00", "..%2F..%2Fadmin", "cache_" + "a" * 5000, "cache_'%20OR%201=1",
                    "%E2%80%AE", "cache_\u00e9"):
            for method in ("GET", "DELETE"):
                r = http.request(method, f"/v1/caches/{cid}")
                assert r.status_code == 404, (cid, method, r.text)
        r = http.post("/v1/chat/completions", json={
            "model": "demo", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
            "cached_content": {"$ne": None}})
        assert r.status_code == 400, r.text
        r = http.post("/v1/chat/completions", json={
            "model": "demo", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
            "cached_content": "cache_\u202e../../x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "cache_not_found", r.text
        huge = "word " * (server.state.settings.http.max_body_bytes // 4)
        r = http.post("/v1/caches", json={"messages": [{"role": "system", "content": huge}]})
        assert r.status_code == 413, r.status_code
        r = http.post("/v1/caches", data=b"{not json")
        assert r.status_code == 400
    # intact
    assert _create(server, tenant)["tokens"] > 0
