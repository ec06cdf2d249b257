"""The routing decision and the router's cache view, as pure logic."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvgate.cachestore.events import CacheEvent
from kvgate.gateway.protocol.wire import EventBatch, decode_event, encode_event
from kvgate.gateway.route.choose import (
    MAX_PER_OPENING,
    OPENS,
    TURN,
    Candidate,
    QueueCost,
    RecentShare,
    choose,
    cost,
    load_bound,
)
from kvgate.gateway.route.index import ClusterIndex
from kvgate.gateway.route.prompt import cache_key_of, conversation_turn


def _hashes(n: int, tag: str = "a") -> list[bytes]:
    return [f"{tag}{i}".encode().ljust(16, b".") for i in range(n)]


def test_longest_cached_prefix_wins_at_equal_load() -> None:
    cands = [Candidate("http://a", 1, 3), Candidate("http://b", 1, 7),
             Candidate("http://c", 1, 0)]
    order = choose(cands, b"k")
    assert order[0].name == "http://b"
    assert sorted(c.name for c in order) == ["http://a", "http://b", "http://c"]


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 8), st.floats(0.0, 30.0)),
                min_size=1, max_size=8),
       st.integers(0, 60), st.floats(0.5, 40.0))
def test_choice_costs_least_among_replicas_under_the_bound(
        rows: list[tuple[int, int, float]], prompt_blocks: int, queue_cost: float) -> None:
    cands = [Candidate(f"http://r{i}", float(waiting), cached, waiting=float(waiting),
                       recent=recent)
             for i, (cached, waiting, recent) in enumerate(rows)]
    first = choose(cands, b"key", prompt_blocks, queue_cost)[0]
    bound = load_bound(cands)
    fits = [c for c in cands if c.recent <= bound or c.waiting <= 0]
    assert fits, "the replica furthest behind is always under the bound"
    spare = max(c.cached_blocks for c in fits)  # over it: only a hit worth its queue
    under = [c for c in cands
             if c in fits or c.cached_blocks - spare > queue_cost * c.waiting]
    assert first in under
    blocks = max(prompt_blocks, *(c.cached_blocks for c in cands))
    mean = sum(c.recent for c in cands) / len(cands)
    waiting = sum(c.waiting for c in cands) / len(cands)
    assert cost(first, blocks, queue_cost, mean, waiting) == pytest.approx(
        min(cost(c, blocks, queue_cost, mean, waiting) for c in under))
    # at equal waiting and share, the longest cached prefix wins
    level = [c for c in under if c.waiting == first.waiting and c.recent == first.recent]
    assert first.cached_blocks == max(c.cached_blocks for c in level)


def test_a_queue_moves_a_short_hit_but_not_a_long_one() -> None:
    """Requests queued on a replica delay a newcomer there; recomputing elsewhere costs the
    blocks, and costs more while the fleet queues (the throughput it takes from the queued
    requests). A hit of the system prompt alone moves away from a queue of four; a
    conversation 40 blocks deep stays (the recent-share bound moves it if its replica keeps
    taking more than its share)."""
    def fleet(cached: int, waiting: float) -> list[Candidate]:
        return [Candidate("http://a", waiting, cached, waiting=waiting),
                Candidate("http://b", 0, 0), Candidate("http://c", 0, 0)]

    # 42 blocks; a request queued costs about 8 blocks of prefill
    assert choose(fleet(12, 2), b"k", 42, 8.0)[0].name == "http://a"  # 30*1.7 + 16 < 42*1.7
    assert choose(fleet(12, 6), b"k", 42, 8.0)[0].name != "http://a"  # 30*3 + 48 > 42*3
    assert choose(fleet(40, 6), b"k", 42, 8.0)[0].name == "http://a"  # 2*3 + 48 < 42*3
    assert choose(fleet(40, 30), b"k", 42, 8.0)[0].name == "http://a"


def test_requests_running_do_not_push_a_hit_away_but_a_share_taken_beyond_the_mean_does(
        ) -> None:
    """Running requests do not delay a newcomer (continuous batching): a replica running
    ten keeps the conversation whose prefix it holds. One that took far more than its
    share of the recent requests loses a short hit (a new conversation that holds only
    its system prompt) but keeps a long one."""
    running = [Candidate("http://a", 10, 30), Candidate("http://b", 0, 0)]
    assert choose(running, b"k", 32, 8.0)[0].name == "http://a"
    ahead = [Candidate("http://a", 1, 12, recent=7.0), Candidate("http://b", 1, 0, recent=4.0),
             Candidate("http://c", 1, 0, recent=4.0)]  # a: 2 requests over the mean of 5
    assert choose(ahead, b"k", 14, 8.0)[0].name != "http://a"  # 2 + 16 > 14
    long = [Candidate(c.name, c.load, 58 if c.name == "http://a" else 0, recent=c.recent)
            for c in ahead]
    assert choose(long, b"k", 60, 8.0)[0].name == "http://a"  # a 58-block hit: 2 + 16 < 60


def test_a_new_prefix_goes_to_the_replica_furthest_behind_even_an_empty_restarted_one(
        ) -> None:
    cands = [Candidate("http://a", 2, 0, free_pages=0, recent=6.0),
             Candidate("http://b", 3, 0, recent=5.0),
             Candidate("http://fresh", 0, 0, free_pages=100)]
    assert choose(cands, b"k", 10, 4.0)[0].name == "http://fresh"


def test_the_recent_share_halves_every_half_life_and_stays_finite() -> None:
    share = RecentShare(half_life=4.0)
    share.sent("a")
    for _ in range(4):
        share.sent("b")
    assert share.of("a") == pytest.approx(0.5)
    assert share.of("b") == pytest.approx(sum(0.5 ** (k / 4) for k in range(4)))
    assert share.of("never") == 0.0
    for _ in range(5000):  # past the renormalisation: the same figures, no overflow
        share.sent("b")
    assert share.of("a") == pytest.approx(0.0, abs=1e-300)
    assert share.of("b") == pytest.approx(1 / (1 - 2 ** (-1 / 4)))


def test_a_withdrawn_request_leaves_the_share_as_if_never_sent() -> None:
    share, twin = RecentShare(half_life=4.0), RecentShare(half_life=4.0)
    share.sent("a")
    twin.sent("a")
    refused = share.sent("b")
    twin.sent("elsewhere")  # the same decay, the refused request's weight on no one
    for _ in range(3):
        share.sent("a")
        twin.sent("a")
    share.withdraw("b", refused)
    assert share.of("b") == pytest.approx(0.0, abs=1e-12)
    assert share.of("a") == pytest.approx(twin.of("a"))
    early = share.sent("b")
    for _ in range(5000):  # across the renormalisation: still its own weight, no more
        share.sent("a")
    late = share.sent("b")
    share.withdraw("b", early)
    assert share.of("b") == pytest.approx(1.0)
    share.withdraw("b", late)
    share.withdraw("b", late)  # twice, or on a replica it never went to: never negative
    share.withdraw("never", late)
    assert share.of("b") == 0.0 and share.of("never") == 0.0


def test_opened_conversations_count_ahead_as_the_requests_they_will_send() -> None:
    """Replica "a" served four 4-turn conversations to their end; "b" has just opened four
    and sent nothing more. By requests "b" is far behind; counted ahead it is as loaded as
    "a", so a fifth new conversation does not pile onto it (its turns would later push
    conversations off their prefixes)."""
    share = RecentShare(half_life=1e9)  # no decay: the arithmetic in plain numbers
    for _ in range(4):
        share.sent("a", OPENS)
        for _ in range(3):
            share.sent("a", TURN)
    for _ in range(4):
        share.sent("b", OPENS)
    share.sent("c")  # not a conversation's: counted as a request, not in the mean
    assert share.per_opening() == pytest.approx(20 / 8)
    assert share.of("b") == pytest.approx(4.0)
    assert share.load("b") == pytest.approx(4 * 20 / 8)
    assert share.load("a") == pytest.approx(16.0)  # its requests, more than 4 openings ahead
    assert share.load("c") == pytest.approx(1.0)
    cands = [Candidate(n, 0, 0, recent=share.load(n)) for n in ("a", "b")]
    by_requests = [Candidate(n, 0, 0, recent=share.of(n)) for n in ("a", "b")]
    assert choose(by_requests, b"k", 10, 4.0)[0].name == "b"
    fresh = Candidate("fresh", 0, 0, recent=share.load("fresh"))
    assert choose([*cands, fresh], b"k", 10, 4.0)[0].name == "fresh"


def test_a_withdrawn_opening_is_no_conversation_of_its_replica() -> None:
    share, twin = RecentShare(half_life=8.0), RecentShare(half_life=8.0)
    for s in (share, twin):
        s.sent("a", OPENS)
        s.sent("a", TURN)
    refused = share.sent("b", OPENS)
    twin.sent("elsewhere")  # the same decay, no opening anywhere
    share.withdraw("b", refused)
    assert share.opened("b") == pytest.approx(0.0, abs=1e-12)
    assert share.load("b") == pytest.approx(0.0, abs=1e-12)
    assert share.per_opening() == pytest.approx(twin.per_opening())
    for _ in range(5000):  # across the renormalisation: the same figures
        share.sent("a", TURN)
        twin.sent("a", TURN)
    assert share.load("a") == pytest.approx(twin.load("a"))


def test_fake_later_turns_cannot_make_an_opening_weigh_thousands() -> None:
    """A tenant that opens one conversation and then sends thousands of requests carrying
    a made-up assistant turn raises the requests-per-opening mean; it is capped, so one
    opening more on a replica never outweighs whole conversations' prefixes."""
    share = RecentShare(half_life=1e9)
    share.sent("a", OPENS)
    for _ in range(5000):
        share.sent("a", TURN)
    share.sent("b", OPENS)
    assert share.per_opening() == MAX_PER_OPENING
    assert share.load("b") == pytest.approx(MAX_PER_OPENING)


def test_a_conversation_opens_on_its_first_chat_request_only() -> None:
    first = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}
    later = {"messages": [*first["messages"], {"role": "assistant", "content": "a"},
                          {"role": "user", "content": "v"}]}
    assert conversation_turn("/v1/chat/completions", first) == OPENS
    assert conversation_turn("/v1/messages", later) == TURN
    for path, body in (("/v1/completions", first), ("/v1/chat/completions", None),
                       ("/v1/chat/completions", {"messages": "not a list"}),
                       ("/v1/chat/completions", {"messages": []})):
        assert conversation_turn(path, body) == 0


def test_provisional_entries_keep_concurrent_first_requests_together() -> None:
    hs = _hashes(5)
    idx = ClusterIndex()
    idx.load("a", "e1", 0, [])
    idx.load("b", "e1", 0, [])
    assert idx.cached_blocks("a", hs, expected=True) == 0
    idx.expect("a", hs)
    assert idx.cached_blocks("a", hs, expected=True) == 5
    assert idx.cached_blocks("a", hs) == 0  # the exact view is the events' alone
    assert idx.cached_blocks("b", hs, expected=True) == 0
    cands = [Candidate("http://a", 1, 5), Candidate("http://b", 0, 0)]
    assert choose(cands, b"k", 5, 1.0)[0].name == "http://a"
    idx.load("a", "e2", 0, [])  # a restart: what was expected there is gone
    assert idx.cached_blocks("a", hs, expected=True) == 0


def test_the_replicas_events_replace_provisional_entries() -> None:
    """Stored blocks move from the router's provisional entries to the view; a block the
    replica evicted is gone at once, not counted as cached until the entry would lapse."""
    hs = _hashes(4)
    idx = ClusterIndex()
    idx.load("a", "e1", 0, [])
    idx.expect("a", hs)
    assert idx.apply(_batch("a", "e1", 1, [("stored", h) for h in hs]))
    assert idx.cached_blocks("a", hs) == 4 and not idx.expected["a"]
    idx.expect("a", hs)  # the next turn of the same conversation was sent there
    assert idx.apply(_batch("a", "e1", 5, [("removed", hs[2]), ("removed", hs[3])]))
    assert idx.cached_blocks("a", hs, expected=True) == 2
    assert idx.cached_blocks("a", hs) == 2


def test_queue_cost_follows_the_prefill_requests_needed() -> None:
    q = QueueCost(initial=8.0, weight=0.5)
    for _ in range(20):
        q.observe(30)
    assert 29 < q.value <= 30
    for _ in range(20):
        q.observe(0)  # a full hit still costs a step: never below one block
    assert 1 <= q.value < 2


def test_a_replica_over_the_load_bound_loses_its_hit() -> None:
    """Over the bound and queueing, a replica loses a hit worth less than its queue (9
    blocks more than the best under the bound, one request queued worth 10)."""
    cands = [Candidate("http://a", 1, 11, recent=20.0, waiting=1),
             Candidate("http://b", 5, 0, waiting=5), Candidate("http://c", 1, 2, recent=1.0)]
    assert choose(cands, b"k", 12, 10.0)[0].name == "http://c"
    # keeping up with it (nothing queued), it is no hot spot: it keeps its hit
    keeping_up = [Candidate(c.name, c.load, c.cached_blocks, recent=c.recent,
                            waiting=0 if c.name == "http://a" else c.waiting) for c in cands]
    assert choose(keeping_up, b"k", 12, 0.1)[0].name == "http://a"


def test_a_long_conversation_is_not_moved_to_spare_it_one_queued_request() -> None:
    """A sweep run lost 5% of its hits to one such spill: 293 cached blocks recomputed on
    another replica because theirs had one request queued and was over the bound. The hit
    outweighs the queue (293 blocks vs one request's ~28); a hit that does not, moves."""
    def fleet(cached: int) -> list[Candidate]:
        return [Candidate("http://a", 1, 0, recent=13.7), Candidate("http://b", 2, cached,
                recent=22.6, waiting=1), Candidate("http://c", 1, 0, recent=12.0)]

    assert load_bound(fleet(293)) < 22.6
    assert choose(fleet(293), b"k", 297, 28.6)[0].name == "http://b"
    assert choose(fleet(20), b"k", 24, 28.6)[0].name != "http://b"


def test_no_hit_follows_the_rendezvous_hash_of_the_first_block() -> None:
    cands = [Candidate(f"http://r{i}", 0, 0, free_pages=10) for i in range(5)]
    firsts = {choose(cands, b"first-block-%d" % k)[0].name for k in range(40)}
    assert len(firsts) > 1  # keys spread over replicas
    for k in range(40):  # and one key always lands on the same one, in any order given
        key = b"first-block-%d" % k
        assert choose(cands, key)[0].name == choose(list(reversed(cands)), key)[0].name


def test_a_client_cache_key_places_new_prefixes_before_free_pages_do() -> None:
    """Requests that share a prompt_cache_key but no cached prefix meet on one replica,
    whatever its free pages; without the key the freest replica wins."""
    cands = [Candidate(f"http://r{i}", 0, 0, free_pages=10 * i) for i in range(5)]
    assert choose(cands, b"tenant-key")[0].name == "http://r4"  # unkeyed: the freest
    firsts = {choose(cands, b"key-%d" % k, keyed=True)[0].name for k in range(40)}
    assert len(firsts) > 1
    for k in range(40):
        key = b"key-%d" % k
        assert choose(cands, key, keyed=True)[0].name == choose(
            list(reversed(cands)), key, keyed=True)[0].name
    busy = [Candidate("http://a", 9, 0, waiting=9), Candidate("http://b", 0, 0)]
    assert all(choose(busy, b"key-%d" % k, keyed=True)[0].name == "http://b"
               for k in range(20))  # the key never outweighs the queue


def test_the_router_reads_the_cache_key_of_either_api() -> None:
    assert cache_key_of(b'{"prompt_cache_key": "user-7", "messages": []}') == "user-7"
    assert cache_key_of(b'{"metadata": {"user_id": "u-1"}, "messages": []}') == "u-1"
    for raw in (b'{"prompt_cache_key": 7}', b'{"prompt_cache_key": ""}', b"[1]", b"{",
                b'{"metadata": "user_id"}', b'{"messages": []}'):
        assert cache_key_of(raw) is None, raw


def _batch(replica: str, epoch: str, first: int, events: list[tuple[str, bytes]]) -> EventBatch:
    evs = [CacheEvent(first + i, kind, "tenant:1", h, "device")  # type: ignore[arg-type]
           for i, (kind, h) in enumerate(events)]
    return EventBatch(replica, epoch, first, first + len(evs) - 1, evs)


def test_events_keep_the_view_exact_and_round_trip_the_wire() -> None:
    hs = _hashes(4)
    idx = ClusterIndex()
    idx.load("r", "e1", 0, [])
    batch = _batch("r", "e1", 1, [("stored", h) for h in hs])
    wire = EventBatch.parse({k.encode(): v.encode() for k, v in batch.fields().items()})
    assert wire == batch
    assert idx.apply(wire)
    assert idx.cached_blocks("r", hs) == 4
    assert idx.apply(_batch("r", "e1", 5, [("removed", hs[2]), ("removed", hs[3])]))
    assert idx.cached_blocks("r", hs) == 2
    assert idx.cached_blocks("r", _hashes(4, "b")) == 0
    ev = CacheEvent(9, "moved", "tenant:2", hs[0], "host")
    assert decode_event(9, encode_event(ev)) == ev


def test_a_gap_waits_for_a_snapshot_then_replays_what_came_after() -> None:
    hs = _hashes(6)
    idx = ClusterIndex()
    idx.load("r", "e1", 0, [])
    assert idx.apply(_batch("r", "e1", 1, [("stored", hs[0])]))
    # events 2..3 lost; 4.. arrive
    assert not idx.apply(_batch("r", "e1", 4, [("stored", hs[3])]))
    assert not idx.apply(_batch("r", "e1", 5, [("stored", hs[4])]))
    assert idx.gaps == 1 and not idx.views["r"].synced
    # the snapshot was taken at event 4: it holds blocks 0..3; event 5 is replayed on top
    assert idx.load("r", "e1", 4, [(h, "device") for h in hs[:4]])
    assert idx.views["r"].synced and idx.views["r"].seq == 5
    assert idx.cached_blocks("r", hs) == 5


def test_a_new_epoch_is_a_restart_and_needs_a_snapshot() -> None:
    hs = _hashes(3)
    idx = ClusterIndex()
    idx.load("r", "e1", 0, [(h, "device") for h in hs])
    assert not idx.apply(_batch("r", "e2", 1, [("stored", hs[0])]))
    assert idx.load("r", "e2", 0, [])
    assert idx.cached_blocks("r", hs) == 1  # the new epoch's event, replayed


def test_a_new_prefix_goes_to_the_replica_with_the_most_free_pages() -> None:
    cands = [Candidate(f"http://r{i}", 0, 0, free_pages=10) for i in range(3)]
    top = choose(cands, b"k")[0].name
    cands = [Candidate(c.name, 0, 0, free_pages=0 if c.name == top else 10) for c in cands]
    assert choose(cands, b"k")[0].name != top
