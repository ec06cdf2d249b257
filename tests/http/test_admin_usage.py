"""``GET /admin/usage`` on the running server: ``group_by=tenant|key|model|day``, the time
forms the ledger's one parser accepts, currencies, and 400s in the OpenAI error shape."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from kvgate.gateway.ledger import Ledger
from kvgate.gateway.ledger.reports import FIELDS
from testkit import Admin, Session, Tenant, ThreadServer


def _chat(http: Session, tenant: Tenant, model_id: str, text: str) -> None:
    r = http.post("/v1/chat/completions", headers=tenant.headers, json={
        "model": model_id, "max_tokens": 2, "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text


def _report(admin: Admin, **params: Any) -> dict[str, Any]:
    r = admin.http.get("/admin/usage", params=params)
    assert r.status_code == 200, r.text
    report: dict[str, Any] = r.json()
    return report


@pytest.fixture(scope="module")
def two_tenants(server: ThreadServer, admin: Admin, model_id: str) -> dict[str, Any]:
    """``usd`` on the default plan with two keys; ``eur`` moved to a EUR plan (made through
    a second Ledger on the server's SQLite file, as ``kvgate plans create`` would)."""
    usd, eur = admin.tenant("usage-usd"), admin.tenant("usage-eur")
    second_key = admin.new_key(usd.id)

    async def euro_plan() -> None:
        ledger = await Ledger.open(server.settings.ledger.db)
        try:
            await ledger.create_plan(f"euro-{eur.id}", input=2_000_000, currency="EUR")
            await ledger.update_tenant(eur.id, plan=f"euro-{eur.id}")
        finally:
            await ledger.close()

    asyncio.run(euro_plan())
    http = Session(server.url)
    try:
        _chat(http, usd, model_id, "one")
        _chat(http, usd, model_id, "two")
        _chat(http, Tenant(usd.id, usd.name, second_key.key, second_key.id), model_id, "three")
        _chat(http, eur, model_id, "four")
    finally:
        http.close()
    return {"usd": usd, "eur": eur, "second_key": second_key}


def test_group_by_tenant(admin: Admin, two_tenants: dict[str, Any]) -> None:
    usd, eur = two_tenants["usd"], two_tenants["eur"]
    report = _report(admin, group_by="tenant", since="1h")
    assert report["group_by"] == "tenant"
    rows = {r["tenant_id"]: r for r in report["rows"]}
    assert (rows[usd.id]["tenant_name"], rows[usd.id]["currency"],
            rows[usd.id]["requests"]) == (usd.name, "USD", 3)
    assert (rows[eur.id]["tenant_name"], rows[eur.id]["currency"],
            rows[eur.id]["requests"]) == (eur.name, "EUR", 1)
    for row in report["rows"]:
        assert set(row) == {"tenant_id", "tenant_name", "currency", *FIELDS}
    # Other tests' tenants are USD too: two currencies, so the totals name none.
    assert report["totals"]["currency"] is None
    assert set(report["totals"]["cost_micros_by_currency"]) == {"EUR", "USD"}
    assert report["totals"]["cost_micros"] is None  # EUR + USD would mean nothing
    assert sum(report["totals"]["cost_micros_by_currency"].values()) == \
        sum(r["cost_micros"] for r in report["rows"])


def test_group_by_key_model_and_day_of_one_tenant(admin: Admin, model_id: str,
                                                  two_tenants: dict[str, Any]) -> None:
    usd = two_tenants["usd"]
    by_key = _report(admin, tenant_id=usd.id, group_by="key")
    assert [(r["key_id"], r["tenant_id"], r["requests"], r["currency"])
            for r in by_key["rows"]] == [(usd.key_id, usd.id, 2, "USD"),
                                         (two_tenants["second_key"].id, usd.id, 1, "USD")]
    assert [r["key_prefix"] for r in by_key["rows"]] == [
        usd.key[:12], two_tenants["second_key"].key[:12]]
    assert by_key["totals"]["currency"] == "USD" and by_key["totals"]["requests"] == 3

    by_model = _report(admin, tenant_id=usd.id, group_by="model")
    assert [(r["model"], r["requests"]) for r in by_model["rows"]] == [(model_id, 3)]
    today = datetime.now(UTC).date().isoformat()
    by_day = _report(admin, tenant_id=usd.id)  # day is the default
    assert by_day["group_by"] == "day"
    assert [r["day"] for r in by_day["rows"]] in ([today], [])  # [] only across midnight
    eur = _report(admin, tenant_id=two_tenants["eur"].id, group_by="model")
    assert eur["totals"]["currency"] == "EUR"
    assert eur["totals"]["cost_micros_by_currency"] == {"EUR": eur["totals"]["cost_micros"]}


@pytest.mark.parametrize("since", [
    "2000-01-01", "2000-01-01T00:00:00", "2000-01-01T00:00:00Z", "2000-01-01T02:00:00+02:00",
    "3650d", "1h"])
def test_since_forms(admin: Admin, two_tenants: dict[str, Any], since: str) -> None:
    report = _report(admin, tenant_id=two_tenants["usd"].id, since=since)
    assert report["totals"]["requests"] == 3


def test_until_excludes_and_an_unencoded_plus_still_means_a_zone(
        admin: Admin, two_tenants: dict[str, Any]) -> None:
    tid = two_tenants["usd"].id
    assert _report(admin, tenant_id=tid, until="2000-01-01")["totals"]["requests"] == 0
    assert _report(admin, tenant_id=tid, since="2999-01-01")["totals"]["requests"] == 0
    # A '+' written into the URL as is arrives as a space; the zone is still read.
    r = admin.http.get(f"/admin/usage?tenant_id={tid}&since=2000-01-01T10:00:00+02:00"
                       "&until=2999-01-01T00:00:00%2B14:00")
    assert r.status_code == 200, r.text
    assert r.json()["totals"]["requests"] == 3


@pytest.mark.parametrize(("query", "param", "words"), [
    ("since=yesterday", "since", "not a time: 'yesterday'"),
    ("until=2026-13-01", "until", "not a time: '2026-13-01'"),
    ("since=7days", "since", "7d"),
    ("since=1d&until=2d", "until", "must be after since"),
    ("since=2026-11-30&until=2026-11-30", "until", "must be after since"),
    ("group_by=week", "group_by", "tenant, key, model, day"),
    ("group_by=hour", "group_by", "got 'hour'"),
])
def test_bad_values_are_400_in_the_openai_shape(admin: Admin, query: str, param: str,
                                                words: str) -> None:
    r = admin.http.get(f"/admin/usage?{query}")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]


def test_unknown_tenant_is_404(admin: Admin) -> None:
    for tenant_id in ("987654", "abc", "99999999999999999999999"):
        r = admin.http.get("/admin/usage", params={"tenant_id": tenant_id})
        assert r.status_code == 404, (tenant_id, r.text)
        assert r.json()["error"]["code"] == "not_found"


def test_openapi_documents_the_groups_and_time_forms(http: Session) -> None:
    doc = http.get("/openapi.json").json()
    params = {p["name"]: p for p in doc["paths"]["/admin/usage"]["get"]["parameters"]}
    assert params["group_by"]["schema"]["enum"] == ["tenant", "key", "model", "day"]
    for name in ("since", "until"):
        assert params[name]["schema"] == {"type": "string"}
    for form in ("2026-11-30", "+02:00", "Z", "7d", "12h", "30m", "UTC"):
        assert form in params["since"]["description"]
