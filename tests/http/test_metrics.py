"""/metrics: parses, names the documented series, and passes promtool when installed."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Admin, Session, Tenant

DOCUMENTED = {
    "kvgate_requests", "kvgate_prompt_tokens", "kvgate_completion_tokens",
    "kvgate_ttft_seconds", "kvgate_request_duration_seconds",
    "kvgate_gateway_overhead_seconds", "kvgate_cache_pages", "kvgate_cache_bytes",
    "kvgate_cache_evictions", "kvgate_cache_promotion_bytes", "kvgate_cache_demotion_bytes",
    "kvgate_cache_hit_tokens", "kvgate_cache_miss_tokens", "kvgate_ledger_commit_seconds",
    "kvgate_ledger_queue_depth", "kvgate_engine_queue_depth",
    "kvgate_engine_running_requests", "kvgate_cost_micros",
}


@pytest.fixture(scope="module")
def scrape(http: Session, tenant: Tenant, model_id: str) -> str:
    auth = {"Authorization": f"Bearer {tenant.key}"}
    body = {"model": model_id, "max_tokens": 2, "messages": [{"role": "user", "content": "m"}]}
    assert http.post("/v1/chat/completions", json=body, headers=auth).status_code == 200
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


@pytest.fixture(scope="module")
def http(server):  # type: ignore[no-untyped-def]
    s = Session(server.url)
    yield s
    s.close()


@pytest.fixture(scope="module")
def tenant(admin):  # type: ignore[no-untyped-def]
    return admin.tenant()


def test_metrics_parse_and_names(scrape: str, tenant: Tenant) -> None:
    families = {f.name: f for f in text_string_to_metric_families(scrape)}
    assert all(name.startswith("kvgate_") for name in families)
    assert set(families) >= DOCUMENTED, DOCUMENTED - set(families)
    reqs = [s for s in families["kvgate_requests"].samples
            if s.labels.get("tenant") == tenant.name and s.name == "kvgate_requests_total"]
    assert any(s.labels["endpoint"] == "/v1/chat/completions" and s.labels["status"] == "200"
               and s.value >= 1 for s in reqs)
    kinds = {s.labels["kind"] for s in families["kvgate_prompt_tokens"].samples
             if s.labels.get("tenant") == tenant.name}
    assert kinds == {"uncached", "cached", "cache_write"}
    tiers = {s.labels["tier"] for s in families["kvgate_cache_bytes"].samples}
    assert tiers == {"device", "host"}
    cap = [s.value for s in families["kvgate_cache_bytes"].samples
           if s.labels == {"tier": "device", "kind": "capacity"}]
    assert cap and cap[0] > 0


def test_health_ready_openapi(http: Session) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    doc = http.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/messages",
            "/admin/tenants", "/admin/usage", "/admin/cache/stats"} <= set(doc["paths"])


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian package 'prometheus')")
def test_promtool_check_metrics(scrape: str) -> None:
    out = subprocess.run(["promtool", "check", "metrics"], input=scrape, text=True,
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cost_metric_matches_ledger(scrape: str, tenant: Tenant, admin: Admin) -> None:
    families = {f.name: f for f in text_string_to_metric_families(scrape)}
    cost = [s.value for s in families["kvgate_cost_micros"].samples
            if s.labels.get("tenant") == tenant.name and s.name.endswith("_total")]
    assert cost == [admin.usage(tenant.id)["cost_micros"]] and cost[0] > 0
