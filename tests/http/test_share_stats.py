"""Guaranteed cache shares as the operator sees them: per tenant in /admin/cache/stats and
on /metrics (labelled by tenant id, like every per-tenant series)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.support import ADMIN_KEY, Admin, Session, Tenant

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_share_usage_and_evictions_by_others_per_tenant(
        admin: Admin, tenant: Tenant, http: Session, model_id: str) -> None:
    body = {"model": model_id, "max_tokens": 1,
            "messages": [{"role": "user", "content": "shares " * 40}]}
    assert http.post("/v1/chat/completions", json=body, headers=tenant.headers).status_code == 200
    stats = admin.http.get("/admin/cache/stats").json()
    assert stats["shares"]["enabled"] is True and stats["shares"]["active_namespaces"] >= 1
    assert stats["shares"]["fallbacks"] >= 0
    mine = [x for x in stats["tenants"] if x["tenant_id"] == tenant.id]
    assert mine and mine[0]["active"] is True
    for key in ("share_bytes", "used_bytes", "evicted_by_others"):
        assert set(mine[0][key]) == {"device", "host"}
    assert 0 < mine[0]["share_bytes"]["device"] <= stats["device"]["capacity_bytes"]
    assert mine[0]["used_bytes"]["device"] + mine[0]["used_bytes"]["host"] > 0

    families = {f.name: f for f in text_string_to_metric_families(
        http.get("/metrics", headers=ADMIN).text)}
    for name in ("kvgate_cache_share_bytes", "kvgate_cache_tenant_bytes",
                 "kvgate_cache_evicted_by_others"):
        samples = [s for s in families[name].samples if s.labels.get("tenant") == str(tenant.id)]
        assert {s.labels["tier"] for s in samples} == {"device", "host"}, name
    share = [s.value for s in families["kvgate_cache_share_bytes"].samples
             if s.labels == {"tier": "device", "tenant": str(tenant.id)}]
    assert len(share) == 1 and share[0] > 0  # other tenants' traffic may move it since
    assert "kvgate_cache_share_fallbacks" in families


def test_tenant_cache_share_bytes_reaches_the_store(
        admin: Admin, tenant: Tenant, http: Session, model_id: str) -> None:
    body = {"model": model_id, "max_tokens": 1,
            "messages": [{"role": "user", "content": "explicit share " * 30}]}
    path = f"/admin/tenants/{tenant.id}"
    for bad in (-1, 2**63, True, "1MiB", 1.5):
        r = admin.http.patch(path, json={"cache_share_bytes": bad})
        assert r.status_code == 400, (bad, r.text)

    def device_share() -> tuple[int, dict]:
        assert http.post("/v1/chat/completions", json=body,
                         headers=tenant.headers).status_code == 200
        stats = admin.http.get("/admin/cache/stats").json()
        mine = [x for x in stats["tenants"] if x["tenant_id"] == tenant.id]
        assert mine and mine[0]["active"] is True
        return int(mine[0]["share_bytes"]["device"]), stats

    _, stats = device_share()
    device = stats["device"]
    page_bytes = device["capacity_bytes"] // device["capacity_pages"]
    for share, expected in ((2 * page_bytes, 2 * page_bytes),
                            (2**63 - 1, device["capacity_bytes"])):  # capped at the tier
        r = admin.http.patch(path, json={"cache_share_bytes": share})
        assert r.status_code == 200 and r.json()["cache_share_bytes"] == share, r.text
        assert device_share()[0] == expected

    r = admin.http.patch(path, json={"cache_share_bytes": None})
    assert r.status_code == 200 and r.json()["cache_share_bytes"] is None, r.text
    got, stats = device_share()
    fair = device["capacity_pages"] // max(1, stats["shares"]["active_namespaces"])
    assert got == fair * page_bytes  # no tenant has an explicit share any more
