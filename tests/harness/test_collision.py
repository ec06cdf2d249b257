"""Forced hash collisions never serve the wrong tokens' KV.

The server has no switch to weaken its hash (and should not), so this test serves the app
in-process (``ThreadServer``) around an engine whose ``CacheStore.hash_fn`` is replaced by
a deliberately colliding one, and compares greedy outputs with a second server that hashes
normally and never hits (every prompt from a fresh tenant).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from kvgate.cachestore.hashing import xxh3_128
from kvgate.gateway.engine import Engine
from kvgate.gateway.http.app import engine_config
from testkit import MiB, Tenant, ThreadServer, request_body, server_settings

BLOCK = 16
MAX_TOKENS = 6
HashFn = Callable[[bytes], bytes]
Serve = Callable[[str, HashFn | None], ThreadServer]


def constant_hash(data: bytes) -> bytes:
    """Every block of every prompt has the same hash."""
    return b"\x00" * 16


def parent_only_hash(data: bytes) -> bytes:
    """Ignores the block's own tokens: block i of any two prompts of a namespace collide,
    all the way down the chain, which is the case a token check must catch."""
    return xxh3_128(data[:16])


def complete(server: ThreadServer, tenant: Tenant, prompt: str) -> tuple[str, int]:
    path, body = request_body("completions", prompt, MAX_TOKENS, temperature=0)
    r = requests.post(server.url + path, json=body, headers=tenant.headers, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    return data["choices"][0]["text"], data["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    started: list[ThreadServer] = []

    def start(name: str, hash_fn: HashFn | None) -> ThreadServer:
        settings = server_settings(tmp_path / name, device="cpu", device_cache_bytes=4 * MiB,
                                   host_cache_bytes=4 * MiB, block_size=BLOCK)
        engine = Engine(engine_config(settings))
        if hash_fn is not None:
            engine.store.hash_fn = hash_fn
        server = ThreadServer(tmp_path / name, settings=settings, engine=engine).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


PROMPTS = {
    "p1": "The quick brown fox jumps over the lazy dog; " * 3,
    "p2": "Pack my box with five dozen liquor jugs, then " * 3,
    "p1_head": "The quick brown fox jumps over the lazy dog; " + "Sphinx of black quartz! " * 4,
    "same_len": "x" * 140,
}


@pytest.mark.parametrize("hash_fn", [constant_hash, parent_only_hash],
                         ids=["constant", "parent-only"])
def test_colliding_hash_never_serves_wrong_kv(serve: Serve, hash_fn: HashFn) -> None:
    reference = serve("reference", None)
    expected = {}
    for name, prompt in PROMPTS.items():
        expected[name], cached = complete(reference, reference.admin.tenant("c"), prompt)
        assert cached == 0

    colliding = serve("colliding", hash_fn)
    tenant = colliding.admin.tenant("c")
    order = ["p1", "p2", "p1_head", "same_len", "p1", "p2"]
    cached_by_name: dict[str, list[int]] = {}
    for name in order:
        text, cached = complete(colliding, tenant, PROMPTS[name])
        assert text == expected[name], f"{name}: output changed under hash collisions"
        cached_by_name.setdefault(name, []).append(cached)
    # Collisions may cost hits, but a verified repeat of the same prompt may still hit; a
    # prompt that shares no block with anything cached must never report one.
    assert cached_by_name["same_len"] == [0]
    assert cached_by_name["p2"][0] == 0
