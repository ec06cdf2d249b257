"""Choosing victims under guaranteed shares: the same decisions as a plain scan of the order,
for work that does not grow with the protected blocks ahead of them.

A tenant within its share holds blocks nobody else may take; they sit wherever the order
puts them, often first. A scan of the order from the start walks past all of them for
every victim, and demotion asks for one host victim per demoted block, so a tenant that
made the engine allocate under many protected blocks cost it time quadratic in the host
tier. The policy counts the blocks it looks at (``inspected``): the tests assert on that
count, never on time.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from kvgate.cachestore import CacheStore
from kvgate.cachestore.block import DEVICE, TIERS, Block
from kvgate.cachestore.policy import EvictionPolicy
from tests.cachestore.conftest import BLOCK, FakeClock, MakeStore, run_request
from tests.cachestore.test_shares import cached_blocks

V, A = "tenant:victim", "tenant:attacker"


@contextmanager
def plain_scan(policy: EvictionPolicy) -> Iterator[None]:
    """Choose victims by scanning the order from its start (the way it was done before)."""
    policy._victims_by_budget = lambda *a: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del policy._victims_by_budget


def _prompt(rng: random.Random, blocks: int) -> list[int]:
    return [rng.randrange(1 << 20) for _ in range(blocks * BLOCK)]


def _hostile(store: CacheStore, rng: random.Random, victim_blocks: int, rounds: int) -> None:
    """The victim fills its host share with old blocks (first in the host order); the
    attacker then writes far more than its shares, so every allocation demotes and every
    demotion needs a host victim behind the victim's protected blocks."""
    for i in range(victim_blocks // 4):
        run_request(store, f"v{i}", V, _prompt(rng, 4))
    for i in range(rounds):
        run_request(store, f"a{i}", A, _prompt(rng, 4))


def _run(make_store: MakeStore, clock: FakeClock, scan: bool) -> tuple[int, int, int]:
    store = make_store(device_pages=16, host_pages=400, eviction="lru")
    rng = random.Random(5)
    secret = _prompt(rng, 4)
    run_request(store, "v-secret", V, secret)
    before = store.policy.inspected
    if scan:
        with plain_scan(store.policy):
            _hostile(store, rng, victim_blocks=200, rounds=100)
    else:
        _hostile(store, rng, victim_blocks=200, rounds=100)
    work = store.policy.inspected - before
    moved = store.counters.demotions.count + store.counters.evictions.lru
    return work, moved, cached_blocks(store, V, secret)


def test_victims_under_many_protected_blocks_cost_what_they_take(
        make_store: MakeStore, clock: FakeClock) -> None:
    work, moved, kept = _run(make_store, clock, scan=False)
    assert moved >= 400  # the attacker's traffic demoted and dropped hundreds of blocks
    assert kept == 4  # and the victim, within its share, lost none of them
    assert work <= 4 * moved  # a few blocks looked at per block taken, not the host tier
    scan_work, scan_moved, scan_kept = _run(make_store, clock, scan=True)
    assert (scan_moved, scan_kept) == (moved, kept)  # the same decisions
    assert scan_work > 25 * work  # the scan walked the victim's ~200 blocks per demotion


def _snapshot(store: CacheStore) -> list[tuple[bytes, str, int]]:
    return sorted((b.hash, b.tier, b.page) for b in store.index.values())


@pytest.mark.parametrize("mode", ["lru", "slru", "newest", "adaptive"])
def test_the_merge_chooses_exactly_what_the_scan_chooses(
        make_store: MakeStore, clock: FakeClock, mode: str) -> None:
    """Random multi-tenant traffic (conversations that grow, shared prefixes, idle gaps
    that make blocks stale, holds for queued requests): at every step, for every tenant
    and tier, the victims found through the shares filter's budgets are the scan's."""
    rng = random.Random(mode)
    store = make_store(device_pages=24, host_pages=48, eviction=mode)
    policy = store.policy
    tenants = [f"tenant:{i}" for i in range(4)]
    history: dict[str, list[list[int]]] = {t: [] for t in tenants}
    checked = held_steps = 0
    for step in range(300):
        t = rng.choice(tenants[: 1 + step % 4])
        convs = history[t]
        if convs and rng.random() < 0.6:  # a follow-up turn, or the shared start again
            base = rng.choice(convs)
            prompt = base + _prompt(rng, rng.randint(0, 2)) if rng.random() < 0.7 else base[:BLOCK]
        else:
            prompt = _prompt(rng, rng.randint(1, 5))
        convs.append(prompt)
        run_request(store, f"s{step}", t, prompt)
        clock.advance(rng.choice([0.5, 5.0, 60.0, 150.0]))
        policy.now = clock.now
        if rng.random() < 0.2:  # queued requests hold what they will match
            holders = [rng.choice(tenants) for _ in range(2)]
            store.hold_queued({f"q{k}": (h, rng.choice(history[h]))
                               for k, h in enumerate(holders) if history[h]})
        held_steps += bool(policy.held)
        for tier in TIERS:
            for owner in tenants:
                for n in (1, 3, 50):
                    fast = policy.victims(tier, n, store.shares.may_evict(owner, tier), owner)
                    f = store.shares.may_evict(owner, tier)
                    assert f is not None

                    def scan_filter(block: Block, f=f) -> bool:  # not a budget filter: the scan
                        return f(block)

                    slow = policy.victims(tier, n, scan_filter, owner)
                    assert fast == slow, (step, tier, owner, n, policy.order)
                    checked += 1
    assert checked == 300 * 2 * 4 * 3
    assert held_steps > 30  # holds took part


def test_a_clock_set_back_keeps_the_newest_order_exact(
        make_store: MakeStore, clock: FakeClock) -> None:
    store = make_store(device_pages=12, host_pages=0, eviction="newest")
    rng = random.Random(3)
    for i in range(6):
        run_request(store, f"v{i}", V if i % 2 else A, _prompt(rng, 2))
        clock.advance(100.0)
        store.policy.now = clock.now
    for now in (clock.now, clock.now - 400.0, clock.now + 50.0):
        store.policy.now = now
        for owner in (A, V):
            f = store.shares.may_evict(owner, DEVICE)
            fast = store.policy.victims(DEVICE, 12, f, owner)
            f2 = store.shares.may_evict(owner, DEVICE)
            assert f2 is not None
            assert fast == store.policy.victims(DEVICE, 12, lambda b, f2=f2: f2(b), owner)
