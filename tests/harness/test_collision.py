"""Forced hash collisions never serve the wrong tokens' KV.

The server has no switch to weaken its hash (and should not), so this test builds the app
in-process with ``create_app`` around an engine whose ``CacheStore.hash_fn`` is replaced by
a deliberately colliding one, serves it on loopback, and compares greedy outputs with a
second server that hashes normally and never hits (every prompt from a fresh tenant).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from cachestore.hashing import xxh3_128
from gateway.config import Settings
from gateway.engine import Engine, EngineConfig
from gateway.http import create_app
from tests.harness.server import ADMIN_KEY, Tenant

HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
BLOCK = 16
MAX_TOKENS = 6


def constant_hash(data: bytes) -> bytes:
    """Every block of every prompt has the same hash."""
    return b"\x00" * 16


def parent_only_hash(data: bytes) -> bytes:
    """Ignores the block's own tokens: block i of any two prompts of a namespace collide,
    all the way down the chain, which is the case a token check must catch."""
    return xxh3_128(data[:16])


class InProcessServer:
    def __init__(self, server: TestServer) -> None:
        self.server = server
        self.session = aiohttp.ClientSession()

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def tenant(self) -> Tenant:
        name = f"c-{uuid.uuid4().hex[:8]}"
        async with self.session.post(self.url + "/admin/tenants", json={"name": name},
                                     headers=HEADERS) as r:
            assert r.status in (200, 201), await r.text()
            tid = (await r.json())["id"]
        async with self.session.post(self.url + f"/admin/tenants/{tid}/keys",
                                     headers=HEADERS) as r:
            assert r.status in (200, 201), await r.text()
            key = (await r.json())["key"]
        return Tenant(int(tid), name, key)

    async def complete(self, tenant: Tenant, prompt: str) -> tuple[str, int]:
        body = {"model": "demo", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        async with self.session.post(self.url + "/v1/completions", json=body,
                                     headers=tenant.headers) as r:
            assert r.status == 200, await r.text()
            data = await r.json()
        return data["choices"][0]["text"], data["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable]:
    started: list[tuple[Engine, TestServer, InProcessServer]] = []

    async def start(name: str, hash_fn: Callable[[bytes], bytes] | None) -> InProcessServer:
        settings = Settings(db=f"sqlite:///{tmp_path / name}.db", admin_key=ADMIN_KEY,
                            device="cpu", device_cache_bytes=4 * 1024 * 1024,
                            host_cache_bytes=4 * 1024 * 1024, block_size=BLOCK)
        engine = Engine(EngineConfig.from_settings(settings))
        if hash_fn is not None:
            engine.store.hash_fn = hash_fn
        await engine.start()
        server = TestServer(create_app(settings, engine=engine), host="127.0.0.1")
        await server.start_server()
        client = InProcessServer(server)
        started.append((engine, server, client))
        return client

    yield start
    for engine, server, client in started:
        await client.session.close()
        await server.close()
        await engine.stop()


PROMPTS = {
    "p1": "The quick brown fox jumps over the lazy dog; " * 3,
    "p2": "Pack my box with five dozen liquor jugs, then " * 3,
    "p1_head": "The quick brown fox jumps over the lazy dog; " + "Sphinx of black quartz! " * 4,
    "same_len": "x" * 140,
}


@pytest.mark.parametrize("hash_fn", [constant_hash, parent_only_hash],
                         ids=["constant", "parent-only"])
async def test_colliding_hash_never_serves_wrong_kv(serve: Callable, hash_fn: Callable) -> None:
    reference = await serve("reference", None)
    expected = {}
    for name, prompt in PROMPTS.items():
        expected[name], cached = await reference.complete(await reference.tenant(), prompt)
        assert cached == 0

    colliding = await serve("colliding", hash_fn)
    tenant = await colliding.tenant()
    order = ["p1", "p2", "p1_head", "same_len", "p1", "p2"]
    cached_by_name: dict[str, list[int]] = {}
    for name in order:
        text, cached = await colliding.complete(tenant, PROMPTS[name])
        assert text == expected[name], f"{name}: output changed under hash collisions"
        cached_by_name.setdefault(name, []).append(cached)
    # Collisions may cost hits, but a verified repeat of the same prompt may still hit; a
    # prompt that shares no block with anything cached must never report one.
    assert cached_by_name["same_len"] == [0]
    assert cached_by_name["p2"][0] == 0
