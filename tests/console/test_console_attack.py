"""The console attacked: paths that look like the public page or its assets must reach
nothing else without a key, every console answer (404s too) carries the security headers,
and the series endpoint answers odd but well-formed input with a 400 in the admin error
shape, the same on SQLite and PostgreSQL, never a 500."""

from __future__ import annotations

import http.client
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import pytest
import requests

from kvgate.gateway.edge.security import CSP, SECURITY_HEADERS
from kvgate.gateway.http.console.pages import is_console_request
from kvgate.gateway.ledger import InvalidInput, Ledger, NotFound
from kvgate.gateway.ledger.series import SeriesQuery
from testkit import Admin, ThreadServer

from .conftest import Workload


def _raw_get(server: ThreadServer, path: str,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    """A GET with the path sent exactly as written (no client-side dot-segment removal
    or re-encoding), as a hostile client would send it."""
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    finally:
        conn.close()


# Paths that start like the page or its assets but are (or decode to) something else.
SNEAKY = [
    "/admin/ui/static/../../tenants",
    "/admin/ui/static/%2e%2e/%2e%2e/tenants",
    "/admin/ui/static/%2E%2E%2F%2E%2E%2Ftenants",
    "/admin/ui/static/..%2f..%2fusage",
    "/admin/ui/static/.%2e/.%2e/cache/stats",
    "/admin/ui/static/..%5c..%5ctenants",
    "/admin/ui/%2e%2e/tenants",
    "/admin/ui/../usage",
    "/admin/ui%2f..%2ftenants",
    "/admin/ui/static/console.js/../../../tenants",
    "/admin/ui/static/console.js%00",
    "/admin/ui/static//console.js",
    "/admin/ui/static/",
    "/admin/ui/static",
    "/admin/ui//",
    "/admin/uiX",
    "/admin/ui.json",
    "/admin/UI",
    "//admin/ui/static/../../tenants",
    "/admin/ui/static/__init__.py",
    "/admin/ui/static/pages.py",
    "/admin/ui/static/index.html",
]


@pytest.mark.parametrize("path", SNEAKY)
def test_lookalike_paths_leak_nothing_without_a_key(server: ThreadServer, workload: Workload,
                                                    path: str) -> None:
    status, headers, body = _raw_get(server, path)
    assert status in (401, 404), (path, status, body[:200])
    assert workload.busy.name not in body and workload.hostile.name not in body
    assert '"rows"' not in body and '"data"' not in body and "import " not in body
    assert headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("path", ["/admin/ui/static/nope.js", "/admin/ui/static/index.html",
                                  "/admin/ui/static/%3Cscript%3E.js",
                                  "/admin/ui/static/..%2f..%2ftenants", "/admin/ui/static/x/y",
                                  "/admin/ui/static/", "/admin/ui//"])
def test_console_errors_carry_the_security_headers(server: ThreadServer, path: str) -> None:
    status, headers, body = _raw_get(server, path)
    assert status in (401, 404), (path, status)
    for name, value in SECURITY_HEADERS.items():
        assert headers.get(name.lower()) == value, (path, name)
    assert "<script" not in body  # a reflected name stays inside a JSON string


@pytest.mark.parametrize("method", ["HEAD", "POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_on_the_page_are_refused_with_the_headers(server: ThreadServer,
                                                                method: str) -> None:
    r = requests.request(method, server.url + "/admin/ui", timeout=30)
    assert r.status_code in (401, 404, 405), (method, r.status_code)
    assert r.headers.get("Content-Security-Policy") == CSP


def test_query_strings_do_not_change_what_is_public(server: ThreadServer) -> None:
    r = requests.get(server.url + "/admin/ui", params={"path": "../../tenants"}, timeout=30)
    assert r.status_code == 200 and r.text.startswith("<!doctype html>")
    assert requests.get(server.url + "/admin/tenants?x=/admin/ui",
                        timeout=30).status_code == 401


def test_only_the_console_routes_are_public() -> None:
    """The exemption follows the route the request resolved to, not the path's text: a
    path the router would hand to another handler is never let through."""
    from aiohttp.test_utils import make_mocked_request
    from aiohttp.web_urldispatcher import UrlDispatcher

    from kvgate.gateway.http.console import routes

    router = UrlDispatcher()
    router.add_routes(routes())
    async def other(request: object) -> None:
        raise AssertionError("not called")

    router.add_get("/admin/{anything}", other)  # a later, broader admin route

    async def resolve(path: str) -> bool:
        req = make_mocked_request("GET", path)
        match = await router.resolve(req)
        req._match_info = match  # what aiohttp sets before the middlewares run
        return is_console_request(req)

    import asyncio
    assert asyncio.run(resolve("/admin/ui"))
    assert asyncio.run(resolve("/admin/ui/static/console.js"))
    assert not asyncio.run(resolve("/admin/tenants"))
    assert not asyncio.run(resolve("/admin/ui%2Fstatic%2Fx"))  # /admin/{anything}, decoded


# -- the series endpoint ---------------------------------------------------------------

@pytest.mark.parametrize("params, param", [
    ({"bucket": "hour", "until": "0001-01-01T05:00:00"}, "until"),  # default since < year 1
    ({"bucket": "day", "until": "0001-01-01"}, "until"),
    ({"bucket": "day", "until": "0001-01-20"}, "until"),
    ({"model": "m\x00odel", "bucket": "all"}, "model"),
    ({"model": "a\nb", "bucket": "all"}, "model"),
])
def test_odd_series_parameters_are_400s(admin: Admin, params: dict[str, str],
                                        param: str) -> None:
    r = admin.http.get("/admin/usage/series", params=params)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


@pytest.mark.parametrize("raw", ["%ED%A0%80", "%FF%FE", "%C0%80", "%00", "x%0Ay"])
def test_undecodable_models_never_fail_the_server(server: ThreadServer, admin: Admin,
                                                  raw: str) -> None:
    r = admin.http.get(f"/admin/usage/series?bucket=all&model={raw}")
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["error"]["param"] == "model"


def test_series_rejects_injection_as_plain_values(admin: Admin, workload: Workload) -> None:
    for name in ("bucket", "group_by"):
        r = admin.http.get("/admin/usage/series",
                           params={name: "tenant; DROP TABLE usage_events --"})
        assert r.status_code == 400 and r.json()["error"]["param"] == name
    r = admin.http.get("/admin/usage/series", params={"bucket": "all",
                                                      "model": "x' OR '1'='1"})
    assert r.status_code == 200 and r.json()["rows"] == []
    # and the ledger still answers
    after = admin.http.get("/admin/usage/series", params={"bucket": "all",
                                                          "tenant_id": workload.busy.id})
    assert after.status_code == 200 and after.json()["totals"]["requests"] >= 4


def test_a_tenant_key_cannot_read_another_tenants_prefixes(server: ThreadServer,
                                                          workload: Workload) -> None:
    for headers in (workload.quiet.headers, {"x-api-key": workload.quiet.key}):
        r = requests.get(server.url + "/admin/cache/prefixes", timeout=30, headers=headers,
                         params={"tenant_id": workload.busy.id})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only"
        assert "hash" not in r.text


def test_prefixes_limit_bounds(admin: Admin, workload: Workload) -> None:
    for bad in ("-1", "+5", " 5", "5.0", "\u0665", "99999999999999999999", "101"):
        r = admin.http.get("/admin/cache/prefixes",
                           params={"tenant_id": workload.busy.id, "limit": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "limit", bad
    ok = admin.http.get("/admin/cache/prefixes",
                        params={"tenant_id": workload.busy.id, "limit": "100"})
    assert ok.status_code == 200
    for p in ok.json()["prefixes"]:
        assert set(p) == {"hash", "tokens", "hits", "tier", "idle_s", "last_used"}


# -- the ledger, on SQLite and PostgreSQL ------------------------------------------------

@pytest.mark.parametrize("model", ["m\x00", "a\x7fb", "\ud800", ""])
async def test_bad_models_are_invalid_input_on_both_databases(ledger: Ledger,
                                                             model: str) -> None:
    with pytest.raises(InvalidInput):
        await ledger.usage_series(SeriesQuery("all", model=model))


@pytest.mark.parametrize("bucket, until", [
    ("hour", datetime(1, 1, 1, 5, tzinfo=UTC)),
    ("day", datetime(1, 1, 1, 5, tzinfo=UTC)),
    ("day", datetime(1, 1, 5, tzinfo=UTC))])
async def test_default_spans_before_year_one_are_invalid_input(ledger: Ledger, bucket: str,
                                                               until: datetime) -> None:
    with pytest.raises(InvalidInput):
        await ledger.usage_series(SeriesQuery(bucket, until=until))


async def test_days_near_year_one_answer(ledger: Ledger) -> None:
    series = await ledger.usage_series(SeriesQuery(
        "hour", until=datetime(1, 1, 5, tzinfo=UTC)))
    assert series["rows"] == []


@pytest.mark.parametrize("name", ["tenant_id", "key_id"])
async def test_ids_past_the_column_are_refused_on_both_databases(ledger: Ledger,
                                                               name: str) -> None:
    with pytest.raises(InvalidInput if name == "key_id" else NotFound):
        await ledger.usage_series(SeriesQuery("all", **{name: 2**31}))


async def test_the_widest_range_answers_on_both_databases(ledger: Ledger) -> None:
    series = await ledger.usage_series(SeriesQuery(
        "all", "tenant", since=datetime(1, 1, 1, tzinfo=UTC),
        until=datetime(9999, 12, 31, tzinfo=UTC)))
    assert series["rows"] == [] and series["totals"]["requests"] == 0
    end = datetime(2026, 3, 1, tzinfo=UTC)
    hours = await ledger.usage_series(SeriesQuery("hour", since=end - timedelta(hours=1000),
                                                  until=end))
    assert hours["rows"] == []


async def _three_models(ledger: Ledger) -> None:
    from tests.ledger.conftest import NOW, event

    t = await ledger.create_tenant("wide")
    for i, model in enumerate(("m1", "m2", "m3")):
        await ledger.record(event(t["id"], model=model, started_at=NOW,
                                  prompt=10 * (i + 1), cached=0, completion=0))


async def test_truncated_answers_keep_whole_totals(ledger: Ledger,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from kvgate.gateway.ledger import series

    await _three_models(ledger)
    monkeypatch.setattr(series, "MAX_ROWS", 2)
    body = await ledger.usage_series(SeriesQuery("all", "model"))
    assert body["truncated"] and len(body["rows"]) == 2
    assert body["totals"]["requests"] == 3 and body["totals"]["prompt_tokens"] == 60


async def test_answers_past_the_held_row_bound_are_refused(
        ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvgate.gateway.ledger import series

    await _three_models(ledger)
    monkeypatch.setattr(series, "MAX_MERGED", 2)
    with pytest.raises(InvalidInput):
        await ledger.usage_series(SeriesQuery("all", "model"))
    # the ledger answers the next question on the same pool
    body = await ledger.usage_series(SeriesQuery("all"))
    assert body["totals"]["requests"] == 3


@pytest.mark.parametrize("bucket, step", [("hour", timedelta(hours=1)),
                                          ("day", timedelta(days=1))])
def test_the_bucket_bound_counts_partial_buckets(bucket: str, step: timedelta) -> None:
    """At most MAX_BUCKETS rows of buckets, also when the range starts and ends mid-bucket."""
    from kvgate.gateway.ledger.series import MAX_BUCKETS

    start = datetime(2026, 3, 1, tzinfo=UTC)
    SeriesQuery(bucket, since=start, until=start + MAX_BUCKETS * step).checked()
    odd = start + timedelta(minutes=30)
    SeriesQuery(bucket, since=odd, until=odd + (MAX_BUCKETS - 1) * step).checked()
    with pytest.raises(InvalidInput):  # 1,001 buckets: a partial one at each end
        SeriesQuery(bucket, since=odd, until=odd + MAX_BUCKETS * step).checked()


async def test_savings_past_64_bits_are_exact_on_both_databases(ledger: Ledger) -> None:
    """cached tokens x price overflows a 64-bit product (SQLite would make it a float);
    the saving is still the exact integer."""
    from tests.ledger.conftest import event

    price = 10**15  # micro-units per million tokens
    await ledger.create_plan("pricey", input=price, cache_read=0)
    t = await ledger.create_tenant("rich", plan="pricey")
    cached = 1_234_567
    await ledger.record(event(t["id"], prompt=cached, cached=cached, completion=0))
    body = await ledger.usage_series(SeriesQuery("all", "tenant"))
    assert cached * price > 2**63
    assert body["rows"][0]["saved_micros"] == cached * price // 10**6
    assert body["rows"][0]["net_saved_micros"] == cached * price // 10**6
