"""One prefill per prefix: a request whose next prompt blocks another running request of
the same namespace is computing waits for them, then reads them from the cache.

Every test holds the engine thread (``hold``) while it submits, so all its requests are
queued before the first step and the schedule is the same on every run. The prompt tokens
each step computes are counted at the runner (``count_prompt_tokens``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from kvgate.gateway.engine import FinishEvent, GenerateRequest
from kvgate.gateway.engine.commands import Call
from kvgate.gateway.engine.engine import Engine
from kvgate.gateway.engine.scheduler import Chunk
from kvgate.gateway.engine.sequence import Sequence

from .conftest import assert_store_consistent, collect, greedy, wait_idle

BS = 16
L = 1000  # prompt tokens: two chunks at the fixture's 512-token step budget
SHARED = (L - 1) // BS * BS  # what a follower of an identical prompt reads: 992
FIRST = 512  # the leader's first chunk: committed before anyone is looked at, so not
# counted as saved by waiting (a follower admitted then would have read it anyway)
OUT = 4


def prompt(n: int = L, salt: int = 0) -> list[int]:
    return [(i * 7919 + salt) % 200 + 32 for i in range(n)]


def count_prompt_tokens(engine: Engine) -> list[int]:
    """A one-item list the runner adds every computed prompt token to."""
    computed = [0]
    run = engine.runner.run

    def counting(chunks: list[Chunk]):  # type: ignore[no-untyped-def]
        for c in chunks:
            computed[0] += max(0, min(c.start + c.length, c.seq.num_prompt_tokens) - c.start)
        return run(chunks)

    engine.runner.run = counting  # type: ignore[method-assign]
    return computed


async def hold(engine: Engine) -> threading.Event:
    """The engine thread blocks on the returned event (set it to go on)."""
    gate = threading.Event()
    engine._inbox.put(Call(gate.wait))
    return gate


async def submitted(engine: Engine, n: int) -> None:
    for _ in range(500):
        if engine._submitted >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{engine._submitted} of {n} requests submitted")


async def run_together(engine: Engine, requests: list[GenerateRequest]
                       ) -> list[tuple[list[int], str, FinishEvent]]:
    """All queued before the first step, in this order."""
    gate = await hold(engine)
    base = engine._submitted
    tasks = []
    for i, req in enumerate(requests):
        tasks.append(asyncio.create_task(collect(engine, req)))
        await submitted(engine, base + i + 1)
    gate.set()
    return list(await asyncio.gather(*tasks))


def hold_commits(engine: Engine, request_id: str, then: Callable[[Sequence], None] | None = None
                 ) -> None:
    """Skip the first commit of ``request_id``'s blocks (and call ``then``): the leader has
    computed its prompt but not committed it by the followers' next look. The scheduler
    never leaves a leader's blocks uncommitted past the step that computes them (followers
    are only looked at when every running prompt finishes within the step), so this stands
    for a leader that is slow to commit."""
    commit = engine.scheduler.commit
    skipped: list[bool] = []

    def held(seq: Sequence) -> None:
        if seq.request_id == request_id and not skipped:
            skipped.append(True)
            if then is not None:
                then(seq)
            return
        commit(seq)

    engine.scheduler.commit = held  # type: ignore[method-assign]


async def lone(make_engine: Callable[..., object], p: list[int]) -> list[int]:
    engine = await make_engine(single_flight_wait_steps=0)
    ids, _, _ = await collect(engine, GenerateRequest("lone", "tenant:lone", p, greedy(OUT)))
    return ids


def single_flight(engine: Engine) -> dict[str, int]:
    stats = engine.cache_stats().as_dict()["single_flight"]
    assert isinstance(stats, dict)
    return stats


async def test_identical_prompts_compute_the_prefix_once(make_engine) -> None:
    p = prompt()
    expected = await lone(make_engine, p)
    engine = await make_engine()
    computed = count_prompt_tokens(engine)
    n = 6
    results = await run_together(
        engine, [GenerateRequest(f"r{i}", "tenant:a", p, greedy(OUT)) for i in range(n)])
    # The leader computes the prompt; each follower only what is past the shared blocks.
    assert computed[0] == L + (n - 1) * (L - SHARED)
    usages = [fin.usage for _, _, fin in results]
    assert usages[0].cached_tokens == 0 and usages[0].cache_write_tokens == L // BS * BS
    for u in usages[1:]:
        assert u.cached_tokens == SHARED  # billed as cache reads, as a later hit would be
        assert u.cache_write_tokens == L // BS * BS - SHARED
    assert sum(u.prompt_tokens - u.cached_tokens for u in usages) == computed[0]
    for ids, _, fin in results:
        assert ids == expected and fin.finish_reason == "length"
    assert single_flight(engine) == {"waited": n - 1, "timed_out": 0,
                                     "saved_tokens": (n - 1) * (SHARED - FIRST)}
    await wait_idle(engine)
    assert_store_consistent(engine.store)
    assert not engine.store._computing


async def test_off_computes_the_overlap_again(make_engine) -> None:
    """The plain baseline: the same schedule without waiting computes the prompt twice."""
    engine = await make_engine(single_flight_wait_steps=0)
    computed = count_prompt_tokens(engine)
    p = prompt()
    results = await run_together(
        engine, [GenerateRequest(f"r{i}", "tenant:a", p, greedy(OUT)) for i in range(2)])
    assert computed[0] > 1.4 * L
    assert results[0][0] == results[1][0]
    assert single_flight(engine)["waited"] == 0


async def test_tenants_never_wait_on_each_other(make_engine) -> None:
    p = prompt()
    engine = await make_engine()
    computed = count_prompt_tokens(engine)
    results = await run_together(engine, [
        GenerateRequest("a", "tenant:a", p, greedy(OUT)),
        GenerateRequest("b", "tenant:b", p, greedy(OUT)),
    ])
    assert computed[0] == 2 * L
    for _, _, fin in results:
        assert fin.usage.cached_tokens == 0  # no read of the other tenant's blocks
        assert fin.usage.cache_write_tokens == L // BS * BS
    assert results[0][0] == results[1][0]
    assert single_flight(engine) == {"waited": 0, "timed_out": 0, "saved_tokens": 0}


async def test_a_longer_follower_computes_only_its_extra_tokens(make_engine) -> None:
    p = prompt()
    longer = p + prompt(300, salt=5)
    expected = await lone(make_engine, longer)
    engine = await make_engine()
    computed = count_prompt_tokens(engine)
    (_, _, f1), (ids, _, f2) = await run_together(engine, [
        GenerateRequest("short", "tenant:a", p, greedy(OUT)),
        GenerateRequest("long", "tenant:a", longer, greedy(OUT)),
    ])
    reused = L // BS * BS  # every full block the leader wrote
    assert f1.usage.cached_tokens == 0
    assert f2.usage.cached_tokens == reused
    assert f2.usage.cache_write_tokens == len(longer) // BS * BS - reused
    assert computed[0] == L + len(longer) - reused
    assert ids == expected
    assert single_flight(engine)["saved_tokens"] == reused - FIRST


async def test_a_cancelled_leader_releases_its_followers(make_engine) -> None:
    p = prompt()
    expected = await lone(make_engine, p)
    engine = await make_engine(max_batch_tokens=2048)  # the leader's prompt in one step
    hold_commits(engine, "lead", then=lambda seq: engine.cancel("lead"))
    results = await run_together(engine, [
        GenerateRequest("lead", "tenant:a", p, greedy(OUT)),
        GenerateRequest("f1", "tenant:a", p, greedy(OUT)),
        GenerateRequest("f2", "tenant:a", p, greedy(OUT)),
    ])
    (_, _, lead), (ids1, _, f1), (ids2, _, f2) = results
    assert lead.finish_reason == "cancelled"
    # The leader committed nothing: the first follower computes the prompt, the second
    # now waits for it instead, then reads it.
    assert f1.usage.cached_tokens == 0
    assert f2.usage.cached_tokens == SHARED
    assert ids1 == ids2 == expected
    assert single_flight(engine) == {"waited": 2, "timed_out": 0, "saved_tokens": SHARED}
    await wait_idle(engine)
    assert_store_consistent(engine.store)
    assert not engine.store._computing


async def test_the_wait_is_bounded(make_engine) -> None:
    p = prompt()
    expected = await lone(make_engine, p)
    engine = await make_engine(max_batch_tokens=2048, single_flight_wait_steps=1)
    hold_commits(engine, "lead")
    computed = count_prompt_tokens(engine)
    (ids1, _, lead), (ids2, _, follower) = await run_together(engine, [
        GenerateRequest("lead", "tenant:a", p, greedy(OUT)),
        GenerateRequest("follower", "tenant:a", p, greedy(OUT)),
    ])
    # It waited one step; the blocks were still not committed, so it computed them.
    assert follower.usage.cached_tokens == 0
    assert computed[0] == 2 * L
    assert ids1 == ids2 == expected
    assert lead.finish_reason == follower.finish_reason == "length"
    assert single_flight(engine) == {"waited": 1, "timed_out": 1, "saved_tokens": 0}
    await wait_idle(engine)
    assert_store_consistent(engine.store)
    assert not engine.store._computing


async def test_a_preempted_leader_releases_its_followers_and_leads_again(make_engine) -> None:
    p = prompt()
    expected = await lone(make_engine, p)
    engine = await make_engine(max_batch_tokens=2048)

    def preempt_after_the_step(seq: Sequence) -> None:
        engine._inbox.put(Call(lambda: engine.scheduler.preempt(seq)))

    hold_commits(engine, "lead", then=preempt_after_the_step)
    results = await run_together(engine, [
        GenerateRequest("lead", "tenant:a", p, greedy(OUT)),
        GenerateRequest("f1", "tenant:a", p, greedy(OUT)),
        GenerateRequest("f2", "tenant:a", p, greedy(OUT)),
    ])
    assert engine.scheduler.num_preemptions == 1
    (ids0, _, lead), (ids1, _, f1), (ids2, _, f2) = results
    # Back at the head of the queue, the leader is admitted again and announces its blocks
    # again; the followers wait for it and read them.
    assert lead.usage.cached_tokens == 0
    assert f1.usage.cached_tokens == f2.usage.cached_tokens == SHARED
    assert ids0 == ids1 == ids2 == expected
    assert single_flight(engine) == {"waited": 2, "timed_out": 0, "saved_tokens": 2 * SHARED}
    await wait_idle(engine)
    assert_store_consistent(engine.store)
    assert not engine.store._computing
