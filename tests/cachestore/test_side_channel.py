"""The eviction side channel, attacked through the real ``CacheStore``.

Prime and probe: the attacker fills the pool with its own prompts, the victim writes a few
fresh blocks or stays idle, and the attacker asks for its prompts again and reads its own
cached token count, as a tenant reads ``cached_tokens``.
By default (one eviction order over all tenants, no reservation) the victim's writes evict
the attacker's coldest blocks, so the count tells whether (and how much) the victim wrote:
the default's exposure, which the README states. With reservations for both (what a tenant
that needs isolation buys), or with fair shares for every active tenant (``--cache-shares``),
the victim, within its share, writes into pages the attacker could not take, so the count
is the same either way.

The two samples (attacker's counts after the victim wrote, and after it did not; trials
in random order) are compared with a two-sample Kolmogorov–Smirnov test, as in the
harness's isolation test: with reservations or shares it must not reject, by default it
must.
"""

from __future__ import annotations

import random

import pytest
from scipy.stats import ks_2samp

from kvgate.cachestore import CacheStore
from tests.cachestore.conftest import BLOCK, MakeStore, run_request
from tests.cachestore.test_shares import cached_blocks

A, V = "tenant:attacker", "tenant:victim"
TRIALS = 30  # each way
ALPHA = 0.001
DEVICE_PAGES = 16
PROBE_BLOCKS = 4


def _fresh(rng: random.Random, blocks: int) -> list[int]:
    return [rng.randrange(1 << 20) for _ in range(blocks * BLOCK)]


def _attack(store: CacheStore, fill_blocks: int, seed: int) -> tuple[list[int], list[int]]:
    """→ the attacker's cached tokens over its own prompts of each trial, after the victim
    wrote / stayed idle. Probing all of them (not only the first) makes the count immune to
    where the segmented LRU puts them: any of its blocks the victim pushed out shows."""
    rng = random.Random(seed)
    run_request(store, "v-warm", V, _fresh(rng, 1))  # the victim is a recent tenant
    arms = [True] * TRIALS + [False] * TRIALS
    rng.shuffle(arms)
    arms.insert(0, False)  # a first round, not counted: the attacker's pool starts empty
    wrote: list[int] = []
    idle: list[int] = []
    for t, victim_writes in enumerate(arms):
        counted = t > 0
        prompts = [_fresh(rng, min(PROBE_BLOCKS, fill_blocks - j))
                   for j in range(0, fill_blocks, PROBE_BLOCKS)]
        for j, prompt in enumerate(prompts):  # prime
            run_request(store, f"prime{t}.{j}", A, prompt)
        if victim_writes:  # a few fresh blocks of its own
            run_request(store, f"victim{t}", V, _fresh(rng, rng.randint(1, 3)))
        cached = sum(cached_blocks(store, A, prompt) for prompt in prompts) * BLOCK  # probe
        if counted:
            (wrote if victim_writes else idle).append(cached)
    return wrote, idle


def _reserved(make_store: MakeStore, host_pages: int) -> CacheStore:
    """The default store (no fair shares), with half of each tier reserved for each."""
    store = make_store(DEVICE_PAGES, host_pages, shares=False)
    pb = store.layout.page_bytes
    for ns in (A, V):
        store.set_reservation(ns, DEVICE_PAGES // 2 * pb, host_pages // 2 * pb)
    return store


@pytest.mark.parametrize("host_pages", [0, 8])
@pytest.mark.parametrize("strategy", ["whole pool", "its fair share"])
def test_the_attacker_cannot_tell_whether_the_victim_wrote(
        make_store: MakeStore, host_pages: int, strategy: str) -> None:
    fill = DEVICE_PAGES + host_pages if strategy == "whole pool" else (
        (DEVICE_PAGES + host_pages) // 2)
    reserved = _attack(_reserved(make_store, host_pages), fill, seed=11)
    fair = _attack(make_store(DEVICE_PAGES, host_pages, shares=True), fill, seed=11)
    default = _attack(make_store(DEVICE_PAGES, host_pages, shares=False), fill, seed=11)
    p = {name: ks_2samp(*arms).pvalue
         for name, arms in (("reserved", reserved), ("fair", fair), ("default", default))}
    print(f"{strategy}, host {host_pages}: KS p " + ", ".join(
        f"{name} {p[name]:.3g}" for name in p))
    assert p["reserved"] > ALPHA, f"with reservations the probe depends on the victim: {reserved}"
    assert p["fair"] > ALPHA, f"with fair shares the probe depends on the victim: {fair}"
    if strategy == "whole pool":  # the attack: by default it reads the victim
        assert p["default"] < ALPHA, f"by default the attack should see the victim: {default}"


@pytest.mark.parametrize("protection", ["reservations", "fair shares"])
def test_protected_the_victim_never_evicts_the_attacker(make_store: MakeStore,
                                                        protection: str) -> None:
    """Not only independent in distribution: not one attacker block went for the victim,
    and no protected block had to go."""
    store = (_reserved(make_store, 8) if protection == "reservations"
             else make_store(DEVICE_PAGES, 8, shares=True))
    _attack(store, DEVICE_PAGES + 8, seed=3)
    stats = store.stats()
    attacker, victim = stats.namespaces[A].share, stats.namespaces[V].share
    assert attacker is not None and victim is not None and stats.shares is not None
    assert attacker.evicted_by_others == {"device": 0, "host": 0}
    assert victim.evicted_by_others == {"device": 0, "host": 0}
    assert stats.shares.fallbacks == 0
