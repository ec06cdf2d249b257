"""Tenants, keys and authentication, including revocation seen by another replica."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from kvgate.gateway.ledger import Conflict, InvalidInput, Ledger, NotFound
from kvgate.gateway.ledger.auth import KeyCache, Principal

from .conftest import event


async def test_reservations_cannot_exceed_the_tier(ledger: Ledger) -> None:
    """A reservation the tier cannot hold beside the others' is refused, with what is left;
    a tenant's own reservation counts once; a deleted tenant's frees its room."""
    cap = {"cache_reserved_device_bytes": 1000, "cache_reserved_host_bytes": 50}
    other = await ledger.create_tenant("reserved", cache_reserved_device_bytes=600,
                                       capacity=cap)
    t = await ledger.create_tenant("acme")
    with pytest.raises(Conflict, match="400 of 1000 bytes are left"):
        await ledger.update_tenant(t["id"], cache_reserved_device_bytes=401, capacity=cap)
    with pytest.raises(Conflict, match="host tier"):
        await ledger.create_tenant("big-host", cache_reserved_host_bytes=51, capacity=cap)
    t3 = await ledger.update_tenant(t["id"], cache_reserved_device_bytes=400, capacity=cap)
    assert t3["cache_reserved_device_bytes"] == 400
    await ledger.update_tenant(other["id"], cache_reserved_device_bytes=600, capacity=cap)
    await ledger.delete_tenant(other["id"])
    t3 = await ledger.update_tenant(t["id"], cache_reserved_device_bytes=1000, capacity=cap)
    assert t3["cache_reserved_device_bytes"] == 1000


async def test_concurrent_claims_never_overcommit(ledger: Ledger) -> None:
    """Reservations and explicit-cache budgets are checked and claimed one transaction at a
    time across the ledger: six concurrent claims of 300 bytes (tokens) on 1,000 leave at
    most 1,000 claimed."""
    cap = {"cache_reserved_device_bytes": 1000}
    tenants = [(await ledger.create_tenant(f"claim-{i}"))["id"] for i in range(6)]
    results = await asyncio.gather(*(
        ledger.update_tenant(t, capacity=cap, cache_reserved_device_bytes=300)
        for t in tenants), return_exceptions=True)
    won = [r for r in results if isinstance(r, dict)]
    assert len(won) == 3 and all(isinstance(r, Conflict) for r in results if r not in won)
    future = datetime.now(UTC) + timedelta(hours=1)
    caches = await asyncio.gather(*(
        ledger.create_cache(f"cache_c{i}", tenants[i % 2], display_name=None, model="m",
                            prefix="{}", tokens=300, expires_at=future, max_tokens=1000,
                            max_total_tokens=1000)
        for i in range(6)), return_exceptions=True)
    assert sum(isinstance(c, dict) for c in caches) == 3  # the total bound, across tenants
    # a deleted tenant's caches go with it (their storage is billed no further)
    await ledger.delete_tenant(tenants[0])
    assert await ledger.list_caches(tenants[0]) == []


async def test_the_default_ttl_is_one_a_request_may_ask_for(ledger: Ledger) -> None:
    with pytest.raises(InvalidInput, match="must not exceed"):
        await ledger.create_tenant("long", cache_ttl_seconds=86400, cache_max_ttl_seconds=60)
    t = await ledger.create_tenant("short", cache_ttl_seconds=60)
    with pytest.raises(InvalidInput, match="must not exceed"):
        await ledger.update_tenant(t["id"], cache_max_ttl_seconds=30)
    with pytest.raises(InvalidInput, match="1 PiB"):
        await ledger.update_tenant(t["id"], cache_reserved_device_bytes=1 << 62)


async def test_tenant_crud_and_soft_delete(ledger: Ledger) -> None:
    t = await ledger.create_tenant("acme", cache_ttl_seconds=600, cache_quota_bytes=1 << 30,
                                   requests_per_minute=60, max_concurrent=4)
    assert t["name"] == "acme" and t["plan"] == "default" and t["status"] == "active"
    assert (t["cache_ttl_seconds"], t["cache_quota_bytes"], t["tokens_per_minute"]) == (
        600, 1 << 30, None)
    assert set(t) == {"id", "name", "status", "plan", "cache_ttl_seconds", "cache_quota_bytes",
                      "cache_reserved_device_bytes", "cache_reserved_host_bytes",
                      "cache_max_ttl_seconds", "requests_per_minute", "tokens_per_minute",
                      "max_concurrent", "budget_daily_micros", "budget_monthly_micros",
                      "min_priority", "max_running_sequences",
                      "created_at"}
    assert t["cache_reserved_device_bytes"] is None  # no reservation: the default
    assert t["cache_max_ttl_seconds"] == 86400
    with pytest.raises(Conflict):
        await ledger.create_tenant("acme")
    with pytest.raises(NotFound):
        await ledger.create_tenant("other", plan="no-such-plan")

    t2 = await ledger.update_tenant(t["id"], tokens_per_minute=10_000, status="suspended")
    assert (t2["tokens_per_minute"], t2["status"], t2["max_concurrent"]) == (10_000, "suspended", 4)
    t2 = await ledger.update_tenant(t["id"], cache_reserved_device_bytes=1 << 28,
                                    cache_max_ttl_seconds=3600)
    assert (t2["cache_reserved_device_bytes"], t2["cache_reserved_host_bytes"],
            t2["cache_max_ttl_seconds"]) == (1 << 28, None, 3600)
    t2 = await ledger.update_tenant(t["id"], cache_reserved_device_bytes=None)  # none again
    assert t2["cache_reserved_device_bytes"] is None
    t2 = await ledger.update_tenant(t["id"], cache_reserved_device_bytes=None,
                                    cache_max_ttl_seconds=None)
    assert t2["cache_max_ttl_seconds"] == 86400
    with pytest.raises(InvalidInput):
        await ledger.update_tenant(t["id"], colour="red")
    with pytest.raises(InvalidInput):
        await ledger.update_tenant(t["id"], max_concurrent=-1)
    assert await ledger.get_tenant(t["id"]) == t2
    assert await ledger.find_tenant("acme") == t2

    key = await ledger.create_key(t["id"])
    await ledger.record(event(t["id"], key["id"]))
    await ledger.delete_tenant(t["id"])
    assert (await ledger.get_tenant(t["id"]))["status"] == "deleted"
    assert await ledger.list_tenants() == []
    assert [x["id"] for x in await ledger.list_tenants(include_deleted=True)] == [t["id"]]
    assert await ledger.authenticate(key["key"]) is None
    assert all(k["revoked_at"] for k in await ledger.list_keys(t["id"]))
    assert (await ledger.usage_report(tenant_id=t["id"]))["totals"]["requests"] == 1
    with pytest.raises(NotFound):
        await ledger.get_tenant(123_456)


async def test_keys_authenticate_and_store_only_a_hash(ledger: Ledger) -> None:
    t = await ledger.create_tenant("acme", requests_per_minute=7)
    key = await ledger.create_key(t["id"])
    assert key["key"].startswith(key["prefix"]) and len(key["key"]) > 40
    p = await ledger.authenticate(key["key"])
    assert isinstance(p, Principal)
    assert (p.key_id, p.role, p.tenant_id, p.tenant_name, p.requests_per_minute) == (
        key["id"], "tenant", t["id"], "acme", 7)
    assert await ledger.authenticate(key["key"] + "x") is None
    assert await ledger.authenticate("") is None
    listed = await ledger.list_keys(t["id"])
    assert [k["id"] for k in listed] == [key["id"]] and "key" not in listed[0]
    async with ledger.engine.connect() as conn:
        stored = [r[0] for r in await conn.exec_driver_sql("SELECT key_sha256 FROM api_keys")]
    assert key["key"] not in stored and all(len(h) == 64 for h in stored)


async def test_revocation_is_immediate_here_and_within_a_second_elsewhere(db_url: str) -> None:
    here, elsewhere = await Ledger.open(db_url), await Ledger.open(db_url)
    try:
        t = await here.create_tenant("acme")
        key = await here.create_key(t["id"])
        assert await here.authenticate(key["key"]) is not None
        assert await elsewhere.authenticate(key["key"]) is not None  # now cached there
        await here.revoke_key(key["id"])
        assert await here.authenticate(key["key"]) is None
        await asyncio.sleep(1.05)  # the cache's whole lifetime
        assert await elsewhere.authenticate(key["key"]) is None
        with pytest.raises(NotFound):
            await here.revoke_key(987_654)
    finally:
        await here.close()
        await elsewhere.close()


async def test_key_cache_serves_from_memory_until_its_ttl() -> None:
    now = [0.0]
    cache = KeyCache(ttl_s=1.0, clock=lambda: now[0])
    loads: list[str] = []

    async def load(digest: str) -> Principal | None:
        loads.append(digest)
        await asyncio.sleep(0.01)
        return None

    await asyncio.gather(*(cache.get("h", load) for _ in range(10)))
    assert loads == ["h"]  # concurrent misses share one query
    now[0] = 0.99
    await cache.get("h", load)
    assert loads == ["h"]
    now[0] = 1.0
    await cache.get("h", load)
    assert loads == ["h", "h"]
    cache.invalidate("h")
    await cache.get("h", load)
    assert len(loads) == 3


async def test_bootstrap_admin(ledger: Ledger) -> None:
    created = await ledger.bootstrap_admin(None)
    assert created is not None
    p = await ledger.authenticate(created)
    assert p is not None and p.is_admin and p.tenant_id is None
    assert await ledger.bootstrap_admin(None) is None  # one exists: nothing printed again

    assert await ledger.bootstrap_admin("operator-chosen-key") is None
    assert await ledger.bootstrap_admin("operator-chosen-key") is None  # idempotent
    p = await ledger.authenticate("operator-chosen-key")
    assert p is not None and p.role == "admin"
    assert len(await ledger.list_keys(None)) == 2


async def test_plans(ledger: Ledger) -> None:
    plan = await ledger.create_plan("pro", input=2_000_000, output=6_000_000)
    assert (plan["cache_read"], plan["cache_write_5m"], plan["cache_write_1h"],
            plan["output"]) == (200_000, 2_500_000, 4_000_000, 6_000_000)
    with pytest.raises(Conflict):
        await ledger.create_plan("pro", input=1)
    updated = await ledger.update_plan("pro", cache_read=1)
    assert updated["cache_read"] == 1 and updated["input"] == 2_000_000
    with pytest.raises(InvalidInput):
        await ledger.update_plan("pro", discount=5)
    with pytest.raises(NotFound):
        await ledger.update_plan("nope", input=1)
    assert [p["name"] for p in await ledger.list_plans()] == ["default", "pro"]
