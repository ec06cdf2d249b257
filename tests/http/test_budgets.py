"""Spend budgets over HTTP, with the official SDKs: the request that would cross a budget is
a 429 in the API's own shape with Retry-After and the reset time; concurrent requests
cannot pass it together; a key's budget is its own; settling gives back the unused worst
case; ``n`` and several prompts multiply the worst case; every generating path is gated;
the admin API takes budgets (and refuses hostile ones). The same on PostgreSQL."""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from kvgate.gateway.ledger.budgets import MAX_BUDGET
from testkit import Admin, MiB, Session, Tenant, ThreadServer
from tests.pg import pg_url  # noqa: F401  (a fixture)

SYSTEM = "You answer questions about the kvgate handbook below. " + "Rule of the house. " * 12
MESSAGES = [{"role": "user", "content": "Say something."}]


def oai(server: ThreadServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def chat(server: ThreadServer, key: str, max_tokens: int = 16, **extra: Any) -> Any:
    return oai(server, key).chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=max_tokens,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True, **extra})


def budget(admin: Admin, tenant_id: int) -> dict[str, Any]:
    r = admin.http.get(f"/admin/tenants/{tenant_id}/budget")
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def worst_case(server: ThreadServer, send: Any) -> int:
    """What the server reserves for a request: asked of a tenant whose budget is 0, whose
    refusal says how much the request may cost."""
    frozen = server.admin.tenant(budget_daily_micros=0)
    with pytest.raises(openai.RateLimitError) as refused:
        send(frozen.key)
    return int(re.search(r"may cost up to (\d+)", refused.value.message).group(1))  # type: ignore[union-attr]


def next_resets() -> set[str]:
    """The next UTC midnight as the message writes it (two, should the day turn now)."""
    now = datetime.now(UTC)
    return {(d.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1))
            .isoformat().replace("+00:00", "Z") for d in (now, now + timedelta(minutes=1))}


def gauge(server: ThreadServer, tenant_id: int, period: str) -> float | None:
    return server.state.metrics.registry.get_sample_value(
        "kvgate_budget_remaining_micros", {"tenant": str(tenant_id), "period": period})


def rejected(server: ThreadServer, tenant_id: int) -> float:
    return server.state.metrics.registry.get_sample_value(
        "kvgate_admission_rejected_total", {"reason": "budget", "tenant": str(tenant_id)}) or 0.0


def spend_until_refused(server: ThreadServer, tenant: Tenant, limit: int = 1000) -> tuple[
        int, openai.RateLimitError]:
    resets = next_resets()
    for ok in range(200):
        try:
            chat(server, tenant.key, max_tokens=8)
        except openai.RateLimitError as exc:
            assert exc.code == "budget_exceeded" and exc.type == "rate_limit_error"
            assert 1 <= int(exc.response.headers["Retry-After"]) <= 86400
            assert any(r in exc.message for r in resets), exc.message
            assert f"budget is {limit} micro-USD" in exc.message
            return ok, exc
    raise AssertionError("never refused")


def check_never_crossed(server: ThreadServer, tenant: Tenant, exc: openai.RateLimitError,
                        limit: int = 1000) -> int:
    spent = budget(server.admin, tenant.id)["daily"]["spent_micros"]
    assert spent == server.admin.usage(tenant.id)["cost_micros"]
    cost = int(re.search(r"may cost up to (\d+)", exc.message).group(1))  # type: ignore[union-attr]
    assert spent <= limit < spent + cost  # refused the one request that would cross it
    return int(spent)


def test_the_request_that_would_cross_a_daily_budget_is_a_429_in_both_shapes(
        server: ThreadServer, admin: Admin) -> None:
    t = admin.tenant(budget_daily_micros=1000)
    ok, exc = spend_until_refused(server, t)
    assert ok >= 1
    spent = check_never_crossed(server, t, exc)
    assert gauge(server, t.id, "daily") == 1000 - spent  # nothing in flight now
    # The SDK's own retries left on: it obeys x-should-retry: false instead of waiting
    # out a Retry-After that is hours away
    an = anthropic.Anthropic(base_url=server.url, api_key=t.key, max_retries=2)
    with pytest.raises(anthropic.RateLimitError) as refused:
        an.messages.create(model="demo", max_tokens=100, messages=[  # type: ignore[list-item]
            {"role": "user", "content": "hello"}])
    body = refused.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    assert any(r in body["error"]["message"] for r in next_resets())
    assert int(refused.value.response.headers["Retry-After"]) >= 1
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert rejected(server, t.id) == 2
    assert budget(admin, t.id)["daily"]["spent_micros"] == spent  # refusals cost nothing


def test_a_request_that_names_no_bound_is_cut_to_what_the_budget_leaves(
        server: ThreadServer, admin: Admin) -> None:
    """No max_tokens: not refused while some output fits; its bound is lowered to what the
    budget holds (as a token rate limit cuts it), and it ends with ``length``."""
    whole = worst_case(server, lambda key: oai(server, key).chat.completions.create(
        model="demo", messages=MESSAGES, extra_body={"ignore_eos": True}))  # type: ignore[arg-type]
    t = admin.tenant(budget_daily_micros=whole // 2)
    r = oai(server, t.key).chat.completions.create(
        model="demo", messages=MESSAGES, extra_body={"ignore_eos": True})  # type: ignore[arg-type]
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens >= 1
    assert budget(admin, t.id)["daily"]["spent_micros"] <= whole // 2
    with pytest.raises(openai.BadRequestError):  # a stated bound is refused, never cut
        chat(server, t.key, max_tokens=server.settings.engine.default_max_tokens)


def test_every_generating_path_is_gated(server: ThreadServer, admin: Admin) -> None:
    t = admin.tenant(budget_monthly_micros=0)
    client = oai(server, t.key)
    calls = [
        lambda: client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2),  # type: ignore[arg-type]
        lambda: client.completions.create(model="demo", prompt="hi", max_tokens=2),
        lambda: client.responses.create(model="demo", input="hi", max_output_tokens=2),
    ]
    for call in calls:
        with pytest.raises(openai.RateLimitError) as refused:
            call()
        assert refused.value.code == "budget_exceeded"
        assert "monthly budget is 0" in refused.value.message
    with Session(server.url, t.headers) as http:
        r = http.post("/v1/caches", json={"messages": [{"role": "system", "content": SYSTEM}]})
        assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded", r.text
        assert http.get("/v1/caches").json()["data"] == []  # nothing pinned or stored
    assert server.ledger_rows(t.id) == {}
    assert rejected(server, t.id) == 4


def test_concurrent_requests_cannot_pass_the_budget_together(
        server: ThreadServer, admin: Admin) -> None:
    worst = worst_case(server, lambda key: chat(server, key))
    limit = worst * 3 + worst // 2
    t = admin.tenant(budget_daily_micros=limit)

    def one(_: int) -> str:
        try:
            c = chat(server, t.key)
            assert c.usage is not None and c.usage.completion_tokens == 16  # ignore_eos
            return "ok"
        except openai.RateLimitError as exc:
            assert exc.code == "budget_exceeded"
            return "refused"

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(one, range(12)))
    spent = budget(admin, t.id)["daily"]["spent_micros"]
    assert spent <= limit
    # each answer costs at least its 16 output tokens (4 each): twelve would not fit
    assert limit < 12 * 16 * 4 and "refused" in outcomes and "ok" in outcomes


def test_a_key_budget_is_its_own(server: ThreadServer, admin: Admin) -> None:
    t = admin.tenant()
    other = admin.new_key(t.id)
    r = admin.http.patch(f"/admin/keys/{t.key_id}", json={"budget_daily_micros": 300})
    assert r.status_code == 200 and r.json()["budget_daily_micros"] == 300, r.text
    _, exc = spend_until_refused(server, t, limit=300)
    assert "this API key's daily budget" in exc.message
    chat(server, other.key, max_tokens=8)  # the tenant has no budget; the other key neither
    keys = {k["id"]: k for k in budget(admin, t.id)["keys"]}
    assert keys[t.key_id]["daily"]["budget_micros"] == 300
    assert keys[t.key_id]["daily"]["spent_micros"] <= 300
    assert keys[other.id]["daily"]["spent_micros"] > 0
    listed = admin.http.get(f"/admin/tenants/{t.id}/keys").json()["data"]
    assert [k["budget_daily_micros"] for k in listed] == [300, None]


def test_settling_gives_back_the_unused_worst_case(server: ThreadServer, admin: Admin) -> None:
    def short(key: str) -> Any:  # room for 200 tokens, but the answer is one word
        return oai(server, key).completions.create(
            model="demo", prompt="a", max_tokens=200, extra_body={"guided_choice": ["yes"]})

    worst = worst_case(server, short)
    t = admin.tenant(budget_daily_micros=worst + 40)
    for _ in range(2):  # the second fits only once the first's unused worst case is back
        c = short(t.key)
        assert c.choices[0].text == "yes" and c.usage is not None
        assert c.usage.completion_tokens < 10
    assert budget(admin, t.id)["daily"]["spent_micros"] <= 40


def test_n_and_several_prompts_multiply_the_worst_case(
        server: ThreadServer, admin: Admin) -> None:
    one = worst_case(server, lambda key: chat(server, key))
    two = worst_case(server, lambda key: chat(server, key, n=2))
    both = worst_case(server, lambda key: oai(server, key).completions.create(
        model="demo", prompt=["hello", "there"], max_tokens=16))
    assert two > one
    t = admin.tenant(budget_daily_micros=(one + two) // 2)
    with pytest.raises(openai.BadRequestError) as refused:
        chat(server, t.key, n=2)
    assert refused.value.code == "request_exceeds_budget"
    assert "Retry-After" not in refused.value.response.headers
    assert chat(server, t.key).usage is not None
    single = worst_case(server, lambda key: oai(server, key).completions.create(
        model="demo", prompt="hello", max_tokens=16))
    assert both > single


@pytest.mark.parametrize("bad", [-1, MAX_BUDGET + 1, 2**63, 1.5, "100", True, [5], {"a": 1}])
def test_hostile_budgets_are_a_400(admin: Admin, bad: object) -> None:
    t = admin.tenant()
    for method, path, body in (
            ("PATCH", f"/admin/tenants/{t.id}", {"budget_daily_micros": bad}),
            ("POST", "/admin/tenants", {"name": f"b-{t.id}", "budget_monthly_micros": bad}),
            ("PATCH", f"/admin/keys/{t.key_id}", {"budget_monthly_micros": bad}),
            ("POST", f"/admin/tenants/{t.id}/keys", {"budget_daily_micros": bad})):
        r = admin.http.request(method, path, json=body)
        assert r.status_code == 400, (method, path, r.text)
        assert r.json()["error"]["param"] in ("budget_daily_micros", "budget_monthly_micros")


def test_admin_sets_clears_and_shows_budgets(admin: Admin) -> None:
    t = admin.tenant(budget_daily_micros=1000)
    r = admin.http.patch(f"/admin/tenants/{t.id}", json={"budget_daily_micros": None,
                                                         "budget_monthly_micros": MAX_BUDGET})
    assert r.status_code == 200, r.text
    assert (r.json()["budget_daily_micros"], r.json()["budget_monthly_micros"]) == (
        None, MAX_BUDGET)
    shown = budget(admin, t.id)
    assert shown["currency"] == "USD" and shown["daily"]["budget_micros"] is None
    assert shown["monthly"]["remaining_micros"] == MAX_BUDGET
    assert shown["monthly"]["resets_at"].endswith("-01T00:00:00Z")
    r = admin.http.post(f"/admin/tenants/{t.id}/keys", json={"budget_daily_micros": 5})
    assert r.status_code == 201 and r.json()["budget_daily_micros"] == 5, r.text
    kid = r.json()["id"]
    for body, status in (({"budget_daily_micros": None}, 200), ({"role": "admin"}, 400),
                         ({"budget_weekly_micros": 5}, 400)):
        r = admin.http.patch(f"/admin/keys/{kid}", json=body)
        assert r.status_code == status, r.text
    r = admin.http.post(f"/admin/tenants/{t.id}/keys",
                        json={"role": "admin", "budget_daily_micros": 5})
    assert r.status_code == 400 and "only tenant keys" in r.json()["error"]["message"]
    assert admin.http.patch("/admin/keys/2147483000", json={}).status_code == 404
    assert admin.http.patch("/admin/keys/x1", json={}).status_code == 404
    assert admin.http.get("/admin/tenants/2147483000/budget").status_code == 404
    admin.revoke(kid)
    assert admin.http.patch(f"/admin/keys/{kid}",
                            json={"budget_daily_micros": 1}).status_code == 409


def test_budgets_on_postgres(pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    migrate = subprocess.run([sys.executable, "-m", "kvgate.gateway.cli", "migrate", "--db",
                              pg_url], capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0, migrate.stderr
    flags = {"device": "cpu", "device_cache_bytes": 16 * MiB, "host_cache_bytes": 16 * MiB,
             "default_max_tokens": 8}
    with ThreadServer(tmp_path / "one", db=pg_url, **flags) as srv, \
            ThreadServer(tmp_path / "two", db=pg_url, **flags) as second:
        t = srv.admin.tenant(budget_daily_micros=1000)
        _, exc = spend_until_refused(srv, t)
        check_never_crossed(srv, t, exc)
        # another replica reads the same spend from the shared ledger
        with pytest.raises(openai.RateLimitError):
            chat(second, t.key, max_tokens=8)

        worst = worst_case(srv, lambda key: chat(srv, key))
        limit = worst * 3 + worst // 2
        c = srv.admin.tenant(budget_daily_micros=limit)
        with ThreadPoolExecutor(12) as pool:
            outcomes = list(pool.map(lambda _: _try(lambda: chat(srv, c.key)), range(12)))
        assert budget(srv.admin, c.id)["daily"]["spent_micros"] <= limit
        assert "refused" in outcomes and "ok" in outcomes

        k = srv.admin.tenant()
        other = srv.admin.new_key(k.id)
        srv.admin.http.patch(f"/admin/keys/{k.key_id}", json={"budget_daily_micros": 300})
        _, exc = spend_until_refused(srv, k, limit=300)
        assert "this API key's" in exc.message
        chat(srv, other.key, max_tokens=8)


def _try(call: Any) -> str:
    try:
        call()
        return "ok"
    except openai.RateLimitError:
        return "refused"
