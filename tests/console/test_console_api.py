"""The console's admin endpoints and its page on the running server: usage series, cache
history and hottest prefixes (admin key only, 400s in the admin error shape), the page
public but empty, with strict security headers, and all of it in /openapi.json."""

from __future__ import annotations

import re
from typing import Any

import pytest
import requests

from kvgate.gateway.edge.security import CSP
from kvgate.gateway.usage import Usage
from testkit import Admin, ThreadServer

from .conftest import Workload, chat


def _get(admin: Admin, path: str, **params: Any) -> dict[str, Any]:
    r = admin.http.get(path, params=params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_series_matches_the_usage_report(admin: Admin, workload: Workload) -> None:
    busy = workload.busy
    series = _get(admin, "/admin/usage/series", bucket="all", group_by="tenant", since="1h")
    report = _get(admin, "/admin/usage", group_by="tenant", since="1h")
    mine = [r for r in series["rows"] if r["tenant_id"] == busy.id]
    theirs = [r for r in report["rows"] if r["tenant_id"] == busy.id]
    assert len(mine) == len(theirs) == 1
    for name in ("requests", "prompt_tokens", "cached_tokens", "cache_write_tokens",
                 "completion_tokens", "cost_micros", "currency"):
        assert mine[0][name] == theirs[0][name], name
    assert mine[0]["requests"] == 4 and mine[0]["cached_tokens"] > 0
    # default plan: one micro-unit per input token, cache reads a tenth of that
    assert mine[0]["saved_micros"] == mine[0]["cached_tokens"]
    assert mine[0]["net_saved_micros"] == mine[0]["cached_tokens"] * 9 // 10
    hourly = _get(admin, "/admin/usage/series", bucket="hour", tenant_id=busy.id)
    assert sum(r["requests"] for r in hourly["rows"]) == 4
    assert all(r["start"].endswith(":00:00Z") for r in hourly["rows"])


def test_history_ends_with_a_sample_taken_now(admin: Admin, workload: Workload) -> None:
    stats = _get(admin, "/admin/cache/stats")
    history = _get(admin, "/admin/cache/history")
    assert history["capacity"] >= 1 and history["interval_s"] > 0
    totals = history["totals"]
    assert totals["hit_tokens"] == stats["hit_tokens"]
    assert totals["miss_tokens"] == stats["miss_tokens"]
    assert totals["ttft_hit_count"] >= 3 and totals["ttft_miss_count"] >= 1
    last = history["points"][-1]
    assert last["tiers"]["device"]["capacity_bytes"] == stats["device"]["capacity_bytes"]
    assert sum(p["hit_tokens"] for p in history["points"]) == stats["hit_tokens"]


def test_ttft_compares_hits_and_misses_of_like_prompt_lengths(
        server: ThreadServer, admin: Admin, workload: Workload) -> None:
    """Known requests as the HTTP layer records them: a long prompt that hit (1,146 ms) and
    a short one that missed (519 ms) land in different bands, and where a band holds both,
    its hit is the faster. The bands above 1k hold only these (the workload's prompts are
    short)."""
    metrics = server.state.metrics
    for usage, outcome, ttft_s in [(Usage(20_000, 19_968, {}, 1), "hit", 1.146),
                                   (Usage(1_500, 0, {300: 1_488}, 1), "miss", 0.519),
                                   (Usage(24_000, 0, {300: 23_984}, 1), "miss", 3.2)]:
        metrics.observe_usage(metrics.tenant(workload.quiet.id), "chat.completions", usage,
                              0, outcome, ttft_s, ttft_s)
    bands = {b["prompt_tokens_from"]: b
             for b in _get(admin, "/admin/cache/history")["totals"]["ttft_by_prompt_length"]}
    assert list(bands) == [0, 1000, 4000, 16000]
    assert bands[1000]["label"] == "1k–4k" and bands[16000]["prompt_tokens_below"] is None
    assert bands[1000]["hit"]["requests"] == 0  # the short miss has no hit beside it
    assert bands[1000]["miss"] == {"requests": 1, "ttft_ms": 519.0, "mean_prompt_tokens": 1500,
                                   "mean_computed_tokens": 1500}
    long_ = bands[16000]
    assert long_["hit"] == {"requests": 1, "ttft_ms": 1146.0, "mean_prompt_tokens": 20_000,
                            "mean_computed_tokens": 32}
    assert long_["miss"]["requests"] == 1 and long_["miss"]["mean_prompt_tokens"] == 24_000
    assert long_["hit"]["ttft_ms"] < long_["miss"]["ttft_ms"]
    assert bands[4000]["hit"]["requests"] == bands[4000]["miss"]["requests"] == 0


def test_hottest_prefixes_show_hashes_never_text(admin: Admin, workload: Workload) -> None:
    body = _get(admin, "/admin/cache/prefixes", tenant_id=workload.busy.id, limit=5)
    assert body["tenant_id"] == workload.busy.id
    assert 1 <= len(body["prefixes"]) <= 5
    top = body["prefixes"][0]
    assert set(top) == {"hash", "tokens", "hits", "tier", "idle_s", "last_used"}
    assert top["hits"] >= 3 and top["tokens"] % body["block_size"] == 0
    assert len(top["hash"]) == 32 and int(top["hash"], 16) >= 0
    other = _get(admin, "/admin/cache/prefixes", tenant_id=workload.quiet.id)
    assert {p["hash"] for p in other["prefixes"]}.isdisjoint(
        p["hash"] for p in body["prefixes"])  # namespaces never share a block


@pytest.mark.parametrize("path, params, param", [
    ("/admin/usage/series", {"bucket": "minute"}, "bucket"),
    ("/admin/usage/series", {"group_by": "plan"}, "group_by"),
    ("/admin/usage/series", {"since": "yesterday"}, "since"),
    ("/admin/usage/series", {"since": "1h", "until": "2h"}, "until"),
    ("/admin/usage/series", {"bucket": "hour", "since": "90d"}, "since"),
    ("/admin/usage/series", {"model": "m" * 300}, "model"),
    ("/admin/cache/prefixes", {}, "tenant_id"),
    ("/admin/cache/prefixes", {"tenant_id": "1", "limit": "0"}, "limit"),
    ("/admin/cache/prefixes", {"tenant_id": "1", "limit": "1e3"}, "limit"),
    ("/admin/cache/prefixes", {"tenant_id": "1", "limit": "101"}, "limit"),
])
def test_bad_parameters_are_400s_naming_them(admin: Admin, workload: Workload, path: str,
                                             params: dict[str, str], param: str) -> None:
    r = admin.http.get(path, params=params)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/admin/usage/series?tenant_id=999999",
                                  "/admin/usage/series?tenant_id=abc",
                                  "/admin/cache/prefixes?tenant_id=999999"])
def test_unknown_tenants_are_404s(admin: Admin, path: str) -> None:
    r = admin.http.get(path)
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("path", ["/admin/usage/series", "/admin/cache/history",
                                  "/admin/cache/prefixes?tenant_id=1"])
def test_only_the_admin_key_reads_them(server: ThreadServer, workload: Workload,
                                       path: str) -> None:
    assert requests.get(server.url + path, timeout=30).status_code == 401
    wrong = requests.get(server.url + path, timeout=30,
                         headers={"Authorization": "Bearer kvg_not_a_key"})
    assert wrong.status_code == 401
    tenant = requests.get(server.url + path, timeout=30, headers=workload.busy.headers)
    assert tenant.status_code == 403
    assert tenant.json()["error"]["code"] == "admin_only"


def test_the_page_is_public_carries_no_data_and_locks_itself_down(
        server: ThreadServer, workload: Workload) -> None:
    for path in ("/admin/ui", "/admin/ui/", "/admin/ui/static/console.js",
                 "/admin/ui/static/console.css"):
        r = requests.get(server.url + path, timeout=30)
        assert r.status_code == 200, path
        assert r.headers["Content-Security-Policy"] == CSP
        assert "frame-ancestors 'none'" in CSP and "unsafe-inline" not in CSP
        assert "unsafe-eval" not in CSP
        assert r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Referrer-Policy"] == "no-referrer"
        assert workload.busy.name not in r.text  # no tenant data in the page or assets
    page = requests.get(server.url + "/admin/ui", timeout=30)
    assert page.headers["Content-Type"].startswith("text/html")
    assert "<script>" not in page.text and " style=" not in page.text
    assert not re.search(r"\son[a-z]+\s*=", page.text)  # no inline event handlers
    js = requests.get(server.url + "/admin/ui/static/console.js", timeout=30).text
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js


@pytest.mark.parametrize("path", ["/admin/ui/static/../../admin/tenants",
                                  "/admin/ui/static/%2e%2e%2fapp.py",
                                  "/admin/ui/static/index.html.bak",
                                  "/admin/ui/static/", "/admin/uix", "/admin/ui/tenants"])
def test_nothing_else_is_served_without_a_key(server: ThreadServer, path: str) -> None:
    r = requests.get(server.url + path, timeout=30)
    assert r.status_code in (401, 404), (path, r.status_code)
    assert "tenant" not in r.text.lower() or r.status_code == 401


def test_openapi_documents_the_new_endpoints(server: ThreadServer) -> None:
    spec = requests.get(server.url + "/openapi.json", timeout=30).json()
    paths = spec["paths"]
    params = {p["name"]: p for p in paths["/admin/usage/series"]["get"]["parameters"]}
    assert params["bucket"]["schema"]["enum"] == ["hour", "day", "all"]
    assert params["group_by"]["schema"]["enum"] == ["none", "tenant", "key", "model"]
    assert {"tenant_id", "key_id", "model", "since", "until"} <= set(params)
    assert "400" in paths["/admin/usage/series"]["get"]["responses"]
    assert "get" in paths["/admin/cache/history"]
    prefixes = {p["name"] for p in paths["/admin/cache/prefixes"]["get"]["parameters"]}
    assert prefixes == {"tenant_id", "limit"}
    assert paths["/admin/ui"]["get"]["security"] == []


def test_history_keeps_sampling_while_requests_run(server: ThreadServer, admin: Admin,
                                                   model_id: str, workload: Workload) -> None:
    """A sample the sampler took is kept in the ring (called directly: tests never wait on
    the clock)."""
    from kvgate.gateway.http.console.history import HISTORY, take_sample

    history = server.app[HISTORY] if server.app is not None else None
    assert history is not None
    chat(server, workload.quiet, model_id, 1)
    sample = take_sample(server.state.engine.cache_stats(), server.state.metrics)
    history.record(sample)
    # the newest sample is this one (the running sampler may have added its own before it)
    assert history._samples[-1] is sample and len(history) <= history.capacity
    body = _get(admin, "/admin/cache/history")
    assert len(body["points"]) == len(history) + 1


