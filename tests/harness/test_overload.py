"""Four times more long prompts than the device pool holds, all at once: each one completes
or is refused politely (429/503 with Retry-After); the pools never exceed their size."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiohttp
import requests
import torch

from kvgate.gateway.engine.demo import SHAPES
from kvgate.kernels.layout import KVLayout
from testkit import Admin, Outcome, ProcessServer, request_body, send

BLOCK = 16
PROMPT_CHARS = 360  # byte-level tokenizer: about one token per character
MAX_TOKENS = 8
FITS = 3  # long prompts the device pool is sized for
KINDS = ("chat", "chat-stream", "completions", "messages-stream")


def demo_page_bytes() -> int:
    shape = SHAPES["demo"]
    return KVLayout(num_layers=shape.num_hidden_layers,
                    num_kv_heads=shape.num_key_value_heads, head_dim=shape.head_dim,
                    block_size=BLOCK, dtype=torch.float32).page_bytes


async def _watch(admin: Admin, seen: list[dict], stop: asyncio.Event) -> None:
    while not stop.is_set():
        seen.append(await asyncio.to_thread(admin.cache_stats))
        await asyncio.sleep(0.05)


async def test_four_times_oversubscribed_pool_degrades_politely(workdir: Path) -> None:
    blocks_per_prompt = -(-(PROMPT_CHARS + 16 + MAX_TOKENS) // BLOCK)
    pool_bytes = FITS * blocks_per_prompt * demo_page_bytes()
    with ProcessServer(workdir, device_cache_bytes=pool_bytes,
                       host_cache_bytes=pool_bytes) as srv:
        tenants = [srv.admin.tenant("burst") for _ in range(2)]
        rng = random.Random(7)
        seen: list[dict] = []
        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch(srv.admin, seen, stop))

        async def one(i: int) -> Outcome:
            text = "".join(rng.choice("abcdefghijklmnop ") for _ in range(PROMPT_CHARS))
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
                return await send(s, srv.url, tenants[i % 2], KINDS[i % len(KINDS)], text,
                                  max_tokens=MAX_TOKENS)

        outcomes = await asyncio.gather(*(one(i) for i in range(4 * FITS)))
        await asyncio.sleep(0.2)
        stop.set()
        await watcher

        for o in outcomes:
            assert o.status in (200, 429, 503), f"{o.kind}: {o.status} {o.text}"
            if o.status == 200:
                assert o.complete, f"{o.kind} {o.request_id} ended without its final event"
            else:
                assert o.retry_after is not None and float(o.retry_after) > 0
        peak = max(snap["device"]["used_pages"] for snap in seen)
        assert peak > seen[-1]["device"]["capacity_pages"] // 2, "the pool was never under pressure"
        assert any(o.status == 200 for o in outcomes)

        assert seen, "cache stats were never read"
        for snap in seen:
            for tier in ("device", "host"):
                t = snap[tier]
                assert t["used_bytes"] <= t["capacity_bytes"], snap
                assert t["used_pages"] <= t["capacity_pages"], snap
        assert seen[-1]["device"]["capacity_bytes"] <= pool_bytes
        assert seen[-1]["blocks"]["active"] == 0

        assert srv.alive()
        path, body = request_body("completions", "still there?", 2)
        r = requests.post(srv.url + path, json=body, headers=tenants[0].headers, timeout=60)
        assert r.status_code == 200
