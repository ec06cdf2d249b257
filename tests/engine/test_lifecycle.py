"""Cancellation frees pages at once; impossible prompts are refused with a clear error."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from kvgate.gateway.engine import (
    EngineOverloaded,
    GenerateRequest,
    PromptTooLong,
    SequenceFailed,
    TokenEvent,
)

from .conftest import collect, greedy, prompt_of


async def _wait_idle(engine) -> dict:
    for _ in range(200):
        stats = engine.cache_stats().as_dict()
        if stats["blocks"]["active"] == 0 and engine.num_running() == 0:
            return stats
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine never went idle: {engine.cache_stats().as_dict()['blocks']}")


async def test_client_leaving_cancels_and_frees_pages(make_engine):
    engine = await make_engine()
    prompt = prompt_of(engine, "a long story " * 10)
    stream = engine.generate(GenerateRequest("r", "tenant:a", prompt, greedy(500)))
    got = 0
    async for ev in stream:
        assert isinstance(ev, TokenEvent)
        got += 1
        if got == 3:
            break
    await stream.aclose()
    stats = await _wait_idle(engine)
    assert stats["blocks"]["active"] == 0
    assert stats["blocks"]["cached"] > 0  # committed blocks stay reusable


async def test_cancel_by_id_reports_cancelled(make_engine):
    engine = await make_engine()
    prompt = prompt_of(engine, "cancel me " * 5)

    async def consume():
        return await collect(engine, GenerateRequest("c", "tenant:a", prompt, greedy(2000)))

    task = asyncio.create_task(consume())
    while engine.num_running() == 0:
        await asyncio.sleep(0.01)
    engine.cancel("c")
    ids, _, fin = await task
    assert fin.finish_reason == "cancelled"
    assert fin.usage.completion_tokens == len(ids) < 2000
    await _wait_idle(engine)


async def test_prompt_longer_than_context_is_rejected(make_engine):
    engine = await make_engine(device_cache_bytes=40 << 20)  # room for the whole context
    prompt = [65] * engine.max_model_len
    with pytest.raises(PromptTooLong, match="context"):
        await collect(engine, GenerateRequest("x", "tenant:a", prompt, greedy(1)))


async def test_prompt_larger_than_device_pool_is_rejected(make_engine):
    page = 4 * 2 * 16 * 2 * 64 * 4
    engine = await make_engine(device_cache_bytes=4 * page)
    with pytest.raises(PromptTooLong, match="device-cache-bytes"):
        await collect(engine, GenerateRequest("x", "tenant:a", [65] * 64, greedy(1)))
    # a prompt that fits still runs
    ids, _, _ = await collect(engine, GenerateRequest("y", "tenant:a", [65] * 40, greedy(3)))
    assert len(ids) == 3


async def test_empty_prompt_is_rejected(make_engine):
    engine = await make_engine()
    with pytest.raises(PromptTooLong, match="empty"):
        await collect(engine, GenerateRequest("x", "tenant:a", [], greedy(1)))


async def test_generation_stops_at_context_length(make_engine):
    engine = await make_engine(max_model_len=64)
    ids, _, fin = await collect(engine, GenerateRequest("x", "tenant:a", [65] * 61, greedy(50)))
    assert fin.finish_reason == "length"
    assert len(ids) == 3
    with pytest.raises(PromptTooLong, match="context is 64 tokens"):
        await collect(engine, GenerateRequest("y", "tenant:a", [65] * 64, greedy(1)))


async def test_full_queue_refuses_new_requests(make_engine):
    engine = await make_engine(max_queue=0)
    with pytest.raises(EngineOverloaded, match="retry"):
        await collect(engine, GenerateRequest("x", "tenant:a", [65] * 8, greedy(1)))
    assert engine.queue_depth() == 0


async def test_stop_ends_every_open_stream(make_engine):
    engine = await make_engine()
    prompt = prompt_of(engine, "never ending")
    tasks = [
        asyncio.create_task(collect(engine, GenerateRequest(f"s{i}", "tenant:a", prompt, greedy(5000))))
        for i in range(3)
    ]
    while engine.num_running() == 0:
        await asyncio.sleep(0.01)
    await engine.stop()
    for ids, _, fin in await asyncio.gather(*tasks):
        assert fin.finish_reason == "cancelled"
        assert len(ids) < 5000


async def test_output_outgrowing_the_whole_pool_ends_with_length(make_engine):
    page = 4 * 2 * 16 * 2 * 64 * 4
    engine = await make_engine(device_cache_bytes=4 * page, host_cache_bytes=0)
    ids, _, fin = await collect(engine, GenerateRequest("x", "tenant:a", [65] * 40, greedy(50)))
    assert fin.finish_reason == "length"
    assert len(ids) == 4 * 16 - 40 + 1  # the last sampled token needs no page of its own
    await _wait_idle(engine)


async def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(make_engine, monkeypatch):
    engine = await make_engine()
    prompt = prompt_of(engine, "fragile")

    def boom(chunks):
        raise RuntimeError("model step exploded")

    with monkeypatch.context() as m:
        m.setattr(engine.runner, "run", boom)
        with pytest.raises(SequenceFailed, match="exploded") as failed:
            await collect(engine, GenerateRequest("a", "tenant:a", prompt, greedy(3)))
    assert isinstance(failed.value.__cause__, RuntimeError)
    assert failed.value.usage.prompt_tokens == len(prompt)  # billable: what it did until then
    await _wait_idle(engine)
    ids, _, fin = await collect(engine, GenerateRequest("b", "tenant:a", prompt, greedy(3)))
    assert len(ids) == 3 and fin.finish_reason == "length"


async def test_cache_shares_follow_the_serve_setting(make_engine) -> None:
    """``--cache-shares 1`` reaches the store (off by default: one eviction order over all
    tenants; reservations are what isolate a tenant)."""
    from kvgate.gateway.config import Settings
    from kvgate.gateway.http.app import engine_config

    assert engine_config(Settings()).cache_shares is False
    assert engine_config(Settings.from_env({}, cache_shares=True)).cache_shares is True
    assert (await make_engine()).store.shares.fair is False
    assert (await make_engine(cache_shares=True)).store.shares.fair is True


async def test_a_caller_that_gives_up_on_an_engine_call_leaves_the_engine_running(make_engine):
    """A task awaiting an engine call (stats, pins, reservations) is cancelled while the
    call waits on the engine thread: the call is dropped, and the engine keeps serving
    (setting a result on the cancelled future used to kill the engine thread)."""
    engine = await make_engine()
    started = threading.Event()
    release = threading.Event()

    def slow() -> int:
        started.set()
        release.wait(5)
        return 1

    first = asyncio.create_task(engine._call(slow))  # occupies the engine thread
    await asyncio.to_thread(started.wait, 5)
    given_up = asyncio.create_task(engine._call(lambda: 2))  # queued behind it
    await asyncio.sleep(0.05)
    given_up.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await given_up  # cancelled: its future too, before the engine thread reaches it
    release.set()
    assert await first == 1
    assert await asyncio.wait_for(engine._call(lambda: 3), 10) == 3  # the thread is alive
    assert engine._thread is not None and engine._thread.is_alive()
