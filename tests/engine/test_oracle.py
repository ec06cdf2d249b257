"""Greedy output through paged KV, with and without cache hits, equals transformers' generate()."""

from __future__ import annotations

import asyncio

from kvgate.gateway.engine import GenerateRequest

from .conftest import collect, greedy, prompt_of

TEXT = "The quick brown fox jumps over the lazy dog, then naps under the old oak tree. "


async def test_miss_then_hit_match_oracle(make_engine, oracle):
    engine = await make_engine()
    prompt = prompt_of(engine, TEXT * 2)
    want = oracle(prompt, 12)
    miss, _, f1 = await collect(engine, GenerateRequest("r1", "tenant:a", prompt, greedy()))
    hit, _, f2 = await collect(engine, GenerateRequest("r2", "tenant:a", prompt, greedy()))
    assert f1.usage.cached_tokens == 0
    assert f2.usage.cached_tokens == (len(prompt) - 1) // 16 * 16 > 0
    assert miss == want
    assert hit == want


async def test_other_namespace_never_hits(make_engine):
    engine = await make_engine()
    prompt = prompt_of(engine, TEXT * 2)
    await collect(engine, GenerateRequest("r1", "tenant:a", prompt, greedy(2)))
    _, _, f = await collect(engine, GenerateRequest("r2", "tenant:b", prompt, greedy(2)))
    assert f.usage.cached_tokens == 0


async def test_batched_requests_match_oracle(make_engine, oracle):
    engine = await make_engine()
    prompts = [prompt_of(engine, TEXT[: 20 + 13 * i] * (1 + i % 2)) for i in range(4)]
    # a warm prefix for two of them, so hits and misses share the batch
    await collect(engine, GenerateRequest("warm", "tenant:a", prompts[1], greedy(1)))
    results = await asyncio.gather(
        *(collect(engine, GenerateRequest(f"b{i}", "tenant:a", p, greedy(10))) for i, p in enumerate(prompts))
    )
    for p, (ids, _, fin) in zip(prompts, results, strict=True):
        assert ids == oracle(p, 10)
        assert fin.finish_reason == "length"


async def test_chunked_prefill_matches_oracle(make_engine, oracle):
    engine = await make_engine(max_batch_tokens=24)
    long_prompt = prompt_of(engine, TEXT * 3)
    short_prompt = prompt_of(engine, "hi")
    assert len(long_prompt) > 5 * 24
    results = await asyncio.gather(
        collect(engine, GenerateRequest("long", "tenant:a", long_prompt, greedy(8))),
        collect(engine, GenerateRequest("short", "tenant:a", short_prompt, greedy(8))),
    )
    assert results[0][0] == oracle(long_prompt, 8)
    assert results[1][0] == oracle(short_prompt, 8)
    # the same prompt again: chunked over cached blocks
    again, _, fin = await collect(engine, GenerateRequest("again", "tenant:a", long_prompt, greedy(8)))
    assert fin.usage.cached_tokens > 0
    assert again == results[0][0]


async def test_preemption_recomputes_and_matches_oracle(make_engine, oracle, demo_loaded):
    page = 4 * 2 * 16 * 2 * 64 * 4  # demo layers x (k,v) x block x kv heads x head dim x fp32
    engine = await make_engine(device_cache_bytes=14 * page, host_cache_bytes=0, max_batch_tokens=64)
    prompts = [prompt_of(engine, f"{i} " + TEXT[: 40 + 5 * i]) for i in range(3)]
    results = await asyncio.gather(
        *(collect(engine, GenerateRequest(f"p{i}", f"tenant:{i}", p, greedy(40))) for i, p in enumerate(prompts))
    )
    assert engine.scheduler.num_preemptions > 0
    for p, (ids, _, _) in zip(prompts, results, strict=True):
        assert ids == oracle(p, 40)
    assert engine.cache_stats().as_dict()["blocks"]["active"] == 0


async def test_hit_from_host_tier_matches_oracle(make_engine, oracle):
    page = 4 * 2 * 16 * 2 * 64 * 4
    engine = await make_engine(device_cache_bytes=12 * page, host_cache_bytes=64 * page)
    prompt = prompt_of(engine, TEXT[:100])
    first, _, _ = await collect(engine, GenerateRequest("a", "tenant:a", prompt, greedy(6)))
    for i in range(3):  # push the first prompt's blocks out of the device pool (the same
        # tenant: another one's traffic may not, its device share protects them)
        other = prompt_of(engine, f"other {i} " + TEXT[::-1][:100])
        await collect(engine, GenerateRequest(f"o{i}", "tenant:a", other, greedy(1)))
    stats = engine.cache_stats().as_dict()
    assert stats["demotions"]["count"] > 0
    again, _, fin = await collect(engine, GenerateRequest("b", "tenant:a", prompt, greedy(6)))
    assert engine.cache_stats().as_dict()["promotions"]["count"] > 0
    assert fin.usage.cached_tokens > 0
    assert again == first == oracle(prompt, 6)


async def test_a_prompt_preempted_before_its_first_token_is_billed_once(make_engine, oracle):
    """A long prompt computed in chunks is preempted part-way by a request of a better
    priority, whose prompt then evicts the blocks the first had written; when the first
    comes back it writes them again. Its prompt is still billed once: each token read,
    written or neither, never written twice (such a usage is refused by the ledger, which
    would leave an answered request unbilled)."""
    page = 4 * 2 * 16 * 2 * 64 * 4
    engine = await make_engine(device_cache_bytes=12 * page, host_cache_bytes=0,
                               max_batch_tokens=16)
    first = prompt_of(engine, (TEXT * 3)[:150])
    second = prompt_of(engine, ("B " + TEXT[::-1] * 3)[:150])
    slow = asyncio.create_task(collect(engine, GenerateRequest(
        "slow", "tenant:a", first, greedy(2), tenant="a", priority=1)))
    for _ in range(2000):
        running = [s for s in engine.scheduler.running if s.request.request_id == "slow"]
        if running and running[0].num_computed >= 48:
            break
        await asyncio.sleep(0.001)
    else:
        raise AssertionError("the first prompt never got part-way")
    urgent = await collect(engine, GenerateRequest("urgent", "tenant:b", second, greedy(2),
                                                   tenant="b", priority=0))
    ids, _, fin = await slow
    assert engine.scheduler.num_preemptions > 0
    assert ids == oracle(first, 2) and urgent[0] == oracle(second, 2)
    for usage, prompt in ((fin.usage, first), (urgent[2].usage, second)):
        usage.validate()
        assert usage.cached_tokens + sum(usage.cache_writes.values()) <= len(prompt)
