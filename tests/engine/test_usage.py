"""What a request is billed for: cached, written and uncached prompt tokens, multi-turn reuse."""

from __future__ import annotations

from kvgate.gateway.engine import GenerateRequest

from .conftest import collect, greedy, prompt_of

BS = 16


async def test_second_turn_hits_first_turn_prompt_and_answer(make_engine):
    engine = await make_engine()
    turn1 = engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about caches. " * 3}]
    )
    answer, _, f1 = await collect(engine, GenerateRequest("t1", "tenant:a", turn1, greedy(37)))
    assert len(answer) == 37
    turn2 = turn1 + answer + engine.tokenizer.encode(
        "<|eot|><|user|>And then?<|eot|><|assistant|>", allow_special=True)
    _, _, f2 = await collect(engine, GenerateRequest("t2", "tenant:a", turn2, greedy(3)))
    # Every full block of turn 1's prompt + answer has K/V (all but the last sampled token).
    covered = (len(turn1) + len(answer) - 1) // BS * BS
    assert covered > len(turn1)
    assert f2.usage.cached_tokens == covered
    assert f1.usage.cached_tokens == 0


async def test_prompt_tokens_split_into_cached_written_uncached(make_engine):
    engine = await make_engine()
    prompt = prompt_of(engine, "billing rule " * 12)
    _, _, f1 = await collect(engine, GenerateRequest("a", "tenant:a", prompt, greedy(5)))
    u = f1.usage
    assert u.prompt_tokens == len(prompt)
    assert u.completion_tokens == 5
    assert u.cached_tokens == 0
    assert u.cache_write_5m_tokens == len(prompt) // BS * BS
    assert u.cache_write_1h_tokens == 0
    assert u.uncached_tokens == len(prompt) % BS
    assert f1.ttft_s is not None and 0 < f1.ttft_s <= f1.engine_s
    _, _, f2 = await collect(engine, GenerateRequest("b", "tenant:a", prompt + [65] * 20, greedy(2)))
    u2 = f2.usage
    assert u2.cached_tokens == len(prompt) // BS * BS
    assert u2.cache_write_tokens == (len(prompt) + 20) // BS * BS - u2.cached_tokens
    assert u2.cached_tokens + u2.cache_write_tokens + u2.uncached_tokens == u2.prompt_tokens


async def test_long_ttl_is_billed_in_the_1h_class(make_engine):
    engine = await make_engine()
    prompt = prompt_of(engine, "system prompt kept for an hour " * 3)
    req = GenerateRequest("a", "tenant:a", prompt, greedy(1), ttl_segments=[(48, 3600.0)])
    _, _, fin = await collect(engine, req)
    assert fin.usage.cache_write_1h_tokens == 48
    assert fin.usage.cache_write_5m_tokens == len(prompt) // BS * BS - 48


async def test_decode_filled_blocks_are_cached_but_not_billed_as_writes(make_engine):
    engine = await make_engine()
    prompt = prompt_of(engine, "x" * 20)
    _, _, fin = await collect(engine, GenerateRequest("a", "tenant:a", prompt, greedy(40)))
    assert fin.usage.cache_write_tokens == len(prompt) // BS * BS
    cached_blocks = engine.cache_stats().as_dict()["blocks"]["cached"]
    assert cached_blocks == (len(prompt) + 40 - 1) // BS


async def test_flush_drops_the_namespace_only(make_engine):
    engine = await make_engine()
    prompt = prompt_of(engine, "flush me " * 10)
    await collect(engine, GenerateRequest("a", "tenant:a", prompt, greedy(1)))
    await collect(engine, GenerateRequest("b", "tenant:b", prompt, greedy(1)))
    assert await engine.flush("tenant:a") > 0
    _, _, fa = await collect(engine, GenerateRequest("c", "tenant:a", prompt, greedy(1)))
    _, _, fb = await collect(engine, GenerateRequest("d", "tenant:b", prompt, greedy(1)))
    assert fa.usage.cached_tokens == 0
    assert fb.usage.cached_tokens > 0


async def test_cache_stats_hit_and_miss_add_up_to_the_billed_prompt_tokens(make_engine):
    """What /admin/cache/stats counts is what the ledger bills: every prompt token is either
    a hit (cached_tokens) or a miss (the rest, cache writes included), once per request,
    the always-computed last token and recomputes after a preemption included."""
    engine = await make_engine()
    prompt = prompt_of(engine, "hit and miss " * 9)
    finishes = []
    for i, extra in enumerate((0, 0, 5, 17)):
        _, _, fin = await collect(engine, GenerateRequest(f"r{i}", "tenant:s", prompt + [66] * extra,
                                                          greedy(3)))
        finishes.append(fin)
    ns = engine.cache_stats().namespaces["tenant:s"]
    assert ns.hit_tokens == sum(f.usage.cached_tokens for f in finishes) > 0
    assert ns.hit_tokens + ns.miss_tokens == sum(f.usage.prompt_tokens for f in finishes)
