"""The adaptive eviction order: the shadow duel follows whichever order wins, so the store
does no worse than plain LRU where LRU wins and better where the newest-first order wins;
and blocks a queued request will match are evicted after everything else."""

from __future__ import annotations

import math
import random

from kvgate.cachestore import CacheStore
from kvgate.cachestore.block import DEVICE
from kvgate.cachestore.duel import Duel, ShadowCache
from tests.cachestore.conftest import BLOCK, FakeClock, MakeStore, run_request

NS = "tenant:a"
PAGES = 64


def prompt(i: int, blocks: int = 4) -> list[int]:
    return list(range(100 * i, 100 * i + blocks * BLOCK))


def replay(store: CacheStore, clock: FakeClock, prompts: list[list[int]]) -> list[int]:
    """Blocks hit per request, one request a second."""
    hits = []
    for k, p in enumerate(prompts):
        clock.advance(1.0)
        hits.append(run_request(store, f"r{k}", NS, p)[0].num_blocks)
    return hits


def loop_trace(n: int = 2000, distinct: int = 32) -> list[list[int]]:
    """A loop over twice as many blocks as the cache holds: LRU evicts each block just
    before it comes round again (no hit at all); keeping an old subset hits on every lap."""
    return [prompt(k % distinct) for k in range(n)]


def repeat_trace(n: int = 1500, gap: int = 5) -> list[list[int]]:
    """Each prompt asked twice, ``gap`` prompts apart, then never again: the reuse distance
    fits the cache, so LRU hits every second ask; favouring old or reused blocks does not."""
    out = []
    for k in range(n):
        out.append(prompt(k))
        if k >= gap:
            out.append(prompt(k - gap))
    return out


def test_where_newest_first_wins_the_duel_follows_it(make_store: MakeStore, clock: FakeClock) -> None:
    trace = loop_trace()
    lru = sum(replay(make_store(PAGES, 0, eviction="lru"), clock, trace))
    newest = sum(replay(make_store(PAGES, 0, eviction="newest"), clock, trace))
    store = make_store(PAGES, 0)  # adaptive, the default
    adaptive = sum(replay(store, clock, trace))
    assert lru == 0 < newest  # what makes this trace the newest-first order's
    assert store.policy.order == "newest"
    assert adaptive > lru
    assert adaptive >= newest // 2  # it switched early, not at the end


def test_where_lru_wins_the_duel_follows_it(make_store: MakeStore, clock: FakeClock) -> None:
    trace = repeat_trace()
    lru_store = make_store(PAGES, 0, eviction="lru")
    lru = replay(lru_store, clock, trace)
    slru = replay(make_store(PAGES, 0, eviction="slru"), clock, trace)
    store = make_store(PAGES, 0)
    adaptive = replay(store, clock, trace)
    assert sum(slru) < sum(lru) // 2  # the starting order loses badly here
    assert store.policy.order == "lru"
    half = len(trace) // 2  # once the duel has decided, exactly LRU's hits
    assert sum(adaptive[half:]) >= sum(lru[half:])
    assert sum(adaptive) >= 0.9 * sum(lru)


def test_the_duel_keeps_its_starting_order_until_it_has_evidence(
    make_store: MakeStore, clock: FakeClock,
) -> None:
    store = make_store(PAGES, 0)
    replay(store, clock, loop_trace(n=20))
    assert store.policy.order == "slru"
    assert store.policy.duel is not None and store.policy.duel.switches == 0


def test_a_fixed_order_has_no_duel(make_store: MakeStore) -> None:
    store = make_store(PAGES, 0, eviction="lru")
    assert store.policy.duel is None and store.policy.order == "lru"


def test_shadow_caches_hold_their_capacity_and_forget_expired_keys() -> None:
    for mode in ("lru", "slru", "newest"):
        shadow = ShadowCache(mode, 8)
        for k in range(40):
            shadow.access([(bytes([k, 0]), 10.0), (bytes([k, 1]), 10.0)], now=float(k))
            assert len(shadow) <= 8
        assert shadow.access([(bytes([39, 0]), 10.0)], now=40.0) == 1  # recent: a hit
        assert shadow.access([(bytes([39, 1]), 10.0)], now=100.0) == 0  # expired
        assert len(shadow) == 1


def test_a_block_a_queued_request_will_match_is_evicted_last(
    make_store: MakeStore, clock: FakeClock,
) -> None:
    store = make_store(8, 0, eviction="lru")
    queued = prompt(1, blocks=3)
    run_request(store, "old", NS, queued)  # the oldest: plain LRU's first victim
    run_request(store, "newer", NS, prompt(2, blocks=3))
    assert store.hold_queued({"q": (NS, [*queued, 7])}) == 3  # its prompt, waiting
    clock.advance(1.0)
    run_request(store, "big", NS, prompt(3, blocks=5))  # needs 3 of the 6 idle pages
    assert run_request(store, "q", NS, queued)[0].num_blocks == 3
    assert run_request(store, "newer2", NS, prompt(2, blocks=3))[0].num_blocks == 0


def test_held_blocks_still_go_when_nothing_else_can(make_store: MakeStore) -> None:
    """A queue cannot wedge the cache: a running request outranks a queued one."""
    store = make_store(8, 0)
    queued = prompt(1, blocks=6)
    run_request(store, "old", NS, queued)
    store.hold_queued({"q": (NS, queued)})
    run_request(store, "big", NS, prompt(3, blocks=8))  # needs every page
    assert run_request(store, "q", NS, queued)[0].num_blocks == 0


def test_holds_are_replaced_not_accumulated(make_store: MakeStore) -> None:
    store = make_store(8, 0, eviction="lru")
    run_request(store, "a", NS, prompt(1, blocks=2))
    assert store.hold_queued({"q": (NS, prompt(1, blocks=2))}) == 2
    assert store.hold_queued({}) == 0
    assert not store.policy.held
    victim = store.policy.victim(DEVICE)
    assert victim is not None and victim.depth == 1  # plain order again, deepest first


def test_another_namespace_cannot_hold_blocks_it_does_not_own(make_store: MakeStore) -> None:
    store = make_store(8, 0)
    run_request(store, "a", NS, prompt(1, blocks=2))
    assert store.hold_queued({"q": ("tenant:b", prompt(1, blocks=2))}) == 0


def test_a_hold_does_not_shield_blocks_beyond_their_share(make_store: MakeStore) -> None:
    """A tenant queueing requests cannot make another tenant evict its own blocks first:
    for another namespace's allocation, held blocks over their share go in plain order."""
    attacker, victim = "tenant:attacker", "tenant:victim"
    store = make_store(12, 0, eviction="lru")  # two active tenants: a fair share of 6 each
    excess = prompt(2, blocks=8)
    run_request(store, "a", attacker, excess)  # the oldest blocks: LRU's first victims
    own = prompt(1, blocks=2)
    run_request(store, "v", victim, own)
    held_before = store.shares.held(attacker, DEVICE)
    assert held_before > 6  # over its share
    store.hold_queued({"q": (attacker, excess)})
    run_request(store, "v2", victim, prompt(3, blocks=3))
    assert run_request(store, "v3", victim, own)[0].num_blocks == 2  # its own blocks stayed
    assert store.shares.held(attacker, DEVICE) < held_before  # the held excess went


class _Scripted:
    """A shadow whose hits per prompt are given."""

    def __init__(self, hits: list[int]) -> None:
        self.hits = iter(hits)

    def access(self, keys: object, now: float) -> int:
        return next(self.hits)


def _switches(newest: list[int], z: float) -> tuple[int, str]:
    """The duel fed one sampled block per prompt; segmented LRU hits once per prompt, LRU
    never, newest-first as given."""
    duel = Duel(64, z=z)  # a small cache: every hash is sampled
    n = len(newest)
    duel.shadows = {"lru": _Scripted([0] * n), "slru": _Scripted([1] * n),  # type: ignore[dict-item]
                    "newest": _Scripted(newest)}
    for i in range(n):
        duel.observe([(i.to_bytes(8, "little"), 300.0)], float(i))
    return duel.switches, duel.choice


def test_the_duel_does_not_follow_noise_but_follows_a_real_lead() -> None:
    before = after = 0
    for seed in range(3):  # newest-first as good on average, only much noisier
        rng = random.Random(seed)
        noisy = [rng.choice([0, 0, 0, 0, 0, 0, 0, 8]) for _ in range(40000)]
        before += _switches(noisy, z=-math.inf)[0]  # the margin alone (as before)
        after += _switches(noisy, z=2.0)[0]
    assert before >= 30  # the margin alone flips back and forth on noise
    assert after * 3 <= before
    rng = random.Random(0)
    steady = [rng.choice([1, 1, 2]) for _ in range(5000)]  # a third better, every prompt
    assert _switches(steady, z=2.0) == (1, "newest")
