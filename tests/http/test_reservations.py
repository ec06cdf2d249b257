"""Cache reservations through the admin API: what the store protects, what the tier can
hold, and the byte-hours billed for them (a server of its own that bills every second)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvgate.gateway.ledger import cost_micros
from kvgate.gateway.ledger.billing import DEFAULT_PRICES
from kvgate.gateway.usage import Usage
from testkit import ADMIN_KEY, MiB, Session, Tenant, ThreadServer

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    with ThreadServer(tmp_path_factory.mktemp("reservations"), device="cpu",
                      device_cache_bytes=16 * MiB, host_cache_bytes=4 * MiB,
                      reservation_bill_interval_s=1) as srv:
        yield srv


def _mine(server: ThreadServer, tenant_id: int) -> dict[str, Any]:
    stats = server.admin.cache_stats()
    rows = [x for x in stats["tenants"] if x["tenant_id"] == tenant_id]
    # a tenant the cache knows nothing of (no blocks, no prompt, no reservation) is not listed
    return rows[0] if rows else {"share_bytes": {"device": 0, "host": 0}}


def _ask(server: ThreadServer, tenant: Tenant, text: str) -> dict[str, Any]:
    with Session(server.url) as http:
        r = http.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": server.state.engine.model_id, "max_tokens": 1,
            "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    return dict(r.json()["usage"])


def test_by_default_no_tenant_is_protected(server: ThreadServer) -> None:
    tenant = server.admin.tenant()
    _ask(server, tenant, "no reservation " * 30)
    mine = _mine(server, tenant.id)
    assert mine["share_bytes"] == {"device": 0, "host": 0}
    assert mine["used_bytes"]["device"] > 0


def test_a_reservation_reaches_the_store_before_any_request(server: ThreadServer) -> None:
    stats = server.admin.cache_stats()
    device = stats["device"]
    pb = device["capacity_bytes"] // device["capacity_pages"]
    tenant = server.admin.tenant(cache_reserved_device_bytes=2 * pb)
    assert _mine(server, tenant.id)["share_bytes"] == {"device": 2 * pb, "host": 0}
    assert _mine(server, tenant.id)["reserved_bytes"] == {"device": 2 * pb, "host": 0}
    path = f"/admin/tenants/{tenant.id}"
    http = server.admin.http
    for bad in (-1, 2**63, True, "1MiB", 1.5):
        r = http.patch(path, json={"cache_reserved_host_bytes": bad})
        assert r.status_code == 400, (bad, r.text)
    # the former name reserves on both tiers
    r = http.patch(path, json={"cache_share_bytes": 3 * pb})
    assert r.status_code == 200, r.text
    assert (r.json()["cache_reserved_device_bytes"], r.json()["cache_reserved_host_bytes"]) == (
        3 * pb, 3 * pb)
    assert _mine(server, tenant.id)["share_bytes"] == {"device": 3 * pb, "host": 3 * pb}
    # more than the tier can hold beside the others: 409, saying what is left
    r = http.patch(path, json={"cache_reserved_device_bytes": device["capacity_bytes"] + 1})
    assert r.status_code == 409 and "left" in r.json()["error"]["message"], r.text
    r = http.post("/admin/tenants", json={"name": f"greedy-{tenant.id}",
                                          "cache_reserved_host_bytes": 5 * MiB})
    assert r.status_code == 409, r.text
    assert _mine(server, tenant.id)["share_bytes"]["device"] == 3 * pb  # unchanged
    r = http.patch(path, json={"cache_reserved_device_bytes": None,
                               "cache_reserved_host_bytes": None})
    assert r.status_code == 200, r.text
    assert _mine(server, tenant.id)["share_bytes"] == {"device": 0, "host": 0}


def test_a_reserved_prefix_survives_another_tenants_flood(server: ThreadServer) -> None:
    """The reserved tenant's cached prompt stays while an unreserved one floods the pool
    with prompts of its own; the same flood evicts an unreserved tenant's prompt."""
    device = server.admin.cache_stats()["device"]
    pb = device["capacity_bytes"] // device["capacity_pages"]
    kept = server.admin.tenant(cache_reserved_device_bytes=64 * pb,
                               cache_reserved_host_bytes=0)
    plain = server.admin.tenant()
    flood = server.admin.tenant()
    text = "reserved system prompt, kept whatever the neighbours do. " * 12
    _ask(server, kept, text)
    _ask(server, plain, text)
    for i in range(2 * device["capacity_pages"] // 24):
        _ask(server, flood, f"flood {i} " + "x y z " * 120)
    assert _ask(server, kept, text)["prompt_tokens_details"]["cached_tokens"] > 0
    assert _ask(server, plain, text)["prompt_tokens_details"]["cached_tokens"] == 0
    server.admin.http.patch(f"/admin/tenants/{kept.id}",
                            json={"cache_reserved_device_bytes": None})


def test_reserved_capacity_is_billed_per_byte_hour(server: ThreadServer) -> None:
    tenant = server.admin.tenant(cache_reserved_device_bytes=1 * MiB)
    deadline = time.monotonic() + 60
    while True:  # the biller's rows, one per second
        rows = [r for r in server.ledger_rows(tenant.id).values()
                if r["endpoint"] == "cache.reservation"]
        if len(rows) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(rows) >= 2, rows
    for r in rows:
        assert r["n"] == 1 and r["prompt_tokens"] == 0 and r["completion_tokens"] == 0
        assert r["cost_micros"] == cost_micros(
            Usage(reserved_byte_seconds=r["reserved_byte_seconds"]), DEFAULT_PRICES)
        held_s = (datetime.fromisoformat(r["finished_at"])
                  - datetime.fromisoformat(r["started_at"])).total_seconds()
        assert r["reserved_byte_seconds"] == pytest.approx(1 * MiB * held_s, rel=0.01, abs=MiB)
    totals = server.admin.usage(tenant.id)
    assert totals["requests"] == 0  # reservation rows are no requests
    assert totals["reserved_byte_seconds"] >= sum(r["reserved_byte_seconds"] for r in rows)
    with Session(server.url) as http:
        families = {f.name: f for f in text_string_to_metric_families(
            http.get("/metrics", headers=ADMIN).text)}
    billed = [s.value for s in families["kvgate_cache_reserved_byte_seconds"].samples
              if s.labels.get("tenant") == str(tenant.id) and s.name.endswith("_total")]
    assert billed and billed[0] >= sum(r["reserved_byte_seconds"] for r in rows)
    # deleting the tenant frees its reservation in the store and stops the billing
    assert server.admin.http.delete(f"/admin/tenants/{tenant.id}").status_code == 200
    assert _mine(server, tenant.id)["share_bytes"]["device"] == 0
