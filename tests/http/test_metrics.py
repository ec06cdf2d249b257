"""/metrics: parses, names the documented series, passes promtool when installed, and is
the operator's only: a key on the API port, or a port of its own; tenants by id."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit import ADMIN_KEY, Admin, Session, Tenant, ThreadServer
from testkit.ci import cannot_run
from testkit.server import server_settings

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}

DOCUMENTED = {
    "kvgate_requests", "kvgate_prompt_tokens", "kvgate_completion_tokens",
    "kvgate_ttft_seconds", "kvgate_request_duration_seconds",
    "kvgate_gateway_overhead_seconds", "kvgate_cache_pages", "kvgate_cache_bytes",
    "kvgate_cache_evictions", "kvgate_cache_promotion_bytes", "kvgate_cache_demotion_bytes",
    "kvgate_cache_hit_tokens", "kvgate_cache_miss_tokens", "kvgate_ledger_commit_seconds",
    "kvgate_ledger_queue_depth", "kvgate_engine_queue_depth",
    "kvgate_engine_running_requests", "kvgate_cost_micros", "kvgate_single_flight_requests",
    "kvgate_single_flight_saved_tokens", "kvgate_engine_parked_sequences",
    "kvgate_engine_preemptions", "kvgate_engine_tenant_service", "kvgate_engine_core_restarts",
}


@pytest.fixture(scope="module")
def scrape(http: Session, tenant: Tenant, model_id: str) -> str:
    auth = {"Authorization": f"Bearer {tenant.key}"}
    body = {"model": model_id, "max_tokens": 2, "messages": [{"role": "user", "content": "m"}]}
    assert http.post("/v1/chat/completions", json=body, headers=auth).status_code == 200
    r = http.get("/metrics", headers=ADMIN)
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
            if s.labels.get("tenant") == str(tenant.id) and s.name == "kvgate_requests_total"]
    assert any(s.labels["endpoint"] == "/v1/chat/completions" and s.labels["status"] == "200"
               and s.value >= 1 for s in reqs)
    kinds = {s.labels["kind"] for s in families["kvgate_prompt_tokens"].samples
             if s.labels.get("tenant") == str(tenant.id)}
    assert kinds == {"uncached", "cached", "cache_write"}
    tiers = {s.labels["tier"] for s in families["kvgate_cache_bytes"].samples}
    assert tiers == {"device", "host"}
    cap = [s.value for s in families["kvgate_cache_bytes"].samples
           if s.labels == {"tier": "device", "kind": "capacity"}]
    assert cap and cap[0] > 0
    service = [s for s in families["kvgate_engine_tenant_service"].samples
               if s.labels.get("tenant") == str(tenant.id)]
    assert service and service[0].value > 0  # the fair scheduler's account of its tokens


def test_health_ready_openapi(http: Session) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    doc = http.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/messages",
            "/admin/tenants", "/admin/usage", "/admin/cache/stats"} <= set(doc["paths"])


def test_promtool_check_metrics(scrape: str) -> None:
    if shutil.which("promtool") is None:
        cannot_run("promtool not installed (Debian package 'prometheus')")
    out = subprocess.run(["promtool", "check", "metrics"], input=scrape, text=True,
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cost_metric_matches_ledger(scrape: str, tenant: Tenant, admin: Admin) -> None:
    families = {f.name: f for f in text_string_to_metric_families(scrape)}
    cost = [s.value for s in families["kvgate_cost_micros"].samples
            if s.labels.get("tenant") == str(tenant.id) and s.name.endswith("_total")]
    assert cost == [admin.usage(tenant.id)["cost_micros"]] and cost[0] > 0


def _tenant_labels(text: str) -> set[str]:
    return {s.labels["tenant"] for f in text_string_to_metric_families(text)
            for s in f.samples if "tenant" in s.labels}


def test_metrics_need_the_admin_key_on_the_api_port(http: Session, tenant: Tenant) -> None:
    """No metrics key and no metrics port: the API port serves /metrics to the admin key
    only; a tenant's key or no key sees nothing of the other tenants."""
    for headers in ({}, tenant.headers, {"Authorization": "Bearer not-a-key"}):
        r = http.get("/metrics", headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert "kvgate_" not in r.text
        assert r.json()["error"]["code"] == "metrics_key_required"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert http.get("/metrics", headers=ADMIN).status_code == 200


def test_tenants_are_labelled_by_id_never_by_name(scrape: str, tenant: Tenant) -> None:
    labels = _tenant_labels(scrape)
    assert str(tenant.id) in labels
    assert tenant.name not in scrape
    # Ids are digits: no tenant can take a reserved value ("none": no tenant; "all": labels off).
    assert all(v.isdigit() or v == "none" for v in labels), labels


def test_a_deleted_tenant_leaves_no_series(http: Session, admin: Admin, model_id: str) -> None:
    gone, kept = admin.tenant("gone"), admin.tenant("kept")
    body = {"model": model_id, "max_tokens": 2, "messages": [{"role": "user", "content": "d"}]}
    for t in (gone, kept):
        assert http.post("/v1/chat/completions", json=body, headers=t.headers).status_code == 200
    assert {str(gone.id), str(kept.id)} <= _tenant_labels(http.get("/metrics",
                                                                   headers=ADMIN).text)
    assert admin.http.delete(f"/admin/tenants/{gone.id}").status_code == 200
    labels = _tenant_labels(http.get("/metrics", headers=ADMIN).text)
    assert str(gone.id) not in labels
    assert str(kept.id) in labels


def test_a_metrics_port_serves_metrics_there_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = server_settings(tmp_path, device="cpu", metrics_port=0, metrics_key="scrape-me")
    with ThreadServer(tmp_path, settings=settings) as srv:
        port = srv.state.metrics.listen_port
        assert port and port != srv.port
        api, scraper = Session(srv.url), Session(f"http://127.0.0.1:{port}")
        try:
            assert api.get("/metrics", headers=ADMIN).status_code == 404
            assert api.get("/metrics", headers={"Authorization": "Bearer scrape-me"}
                           ).status_code == 404
            assert scraper.get("/metrics").status_code == 401
            assert scraper.get("/metrics", headers={"Authorization": "Bearer wrong"}
                               ).status_code == 401
            r = scraper.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
            assert r.status_code == 200 and "kvgate_cache_bytes" in r.text
            assert scraper.get("/metrics", headers=ADMIN).status_code == 200
            assert scraper.get("/v1/models", headers=ADMIN).status_code == 404
            srv.state.settings.metrics.metrics_key = None  # no key: the port alone guards it
            assert scraper.get("/metrics").status_code == 200
            assert api.get("/metrics", headers=ADMIN).status_code == 404
        finally:
            api.close()
            scraper.close()
