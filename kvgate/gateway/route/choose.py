"""The routing decision: which replica gets a request, and in what order to try the rest.

Each replica is scored by what the request would cost there, in blocks of prefill work:

    cost = (1 + fleet waiting) * (uncached + queue_cost * excess)
           + uncached * pressure + queue_cost * waiting

- ``uncached``: the prompt's blocks it does not hold, the prefill it would still have to
  do: the longer the cached prefix (for this tenant: the hashes are namespace-scoped), the
  less.
- ``excess``: how many more of this router's recent requests it took than the replicas'
  mean (``RecentShare``: each request weighs ``2 ** (-n / HALF_LIFE)`` after ``n`` more
  were routed; for a request that opens a conversation, each conversation a replica
  opened counts as the requests a conversation sends, before they arrive:
  ``RecentShare.load``; never negative: a credit for the replicas behind outweighed whole
  conversations' prefixes once the fleet queued), each worth ``queue_cost`` blocks, the
  router's running mean of the blocks its requests had to prefill (``QueueCost``): a
  replica that took one request more than its share did about that much more work. So a
  conversation stays where its prefix is while that replica is a little ahead; a tenant's
  next new conversation, which holds only the system prompt anywhere, goes to a replica
  behind once the excess outweighs the system prompt's blocks; a new prefix goes to the
  replica furthest behind, a freshly restarted one included.
- ``fleet waiting``: the replicas' mean ``waiting``. Both recomputation and imbalance are
  throughput lost, and throughput is what a queueing fleet lacks: on an idle fleet a spill
  costs its recomputation alone and a queue of a few requests outweighs it (the answer
  starts sooner elsewhere); on a saturated one, where moving work only adds to it,
  conversations stay where their prefixes are, and balance weighs as much as before.
- ``pressure``: the share of the replica's device pages in use. Once they are full, every
  block computed there evicts a cached one someone else may need.
- ``waiting``: requests queued there that the engine has not started (its load report).
  Requests it is running do not delay a newcomer's start (continuous batching), so they
  are not charged: counting them made every burst push conversations off their prefixes.
- Among equal costs the replica with the most free device pages wins (a new prefix stays
  where it lands), then a rendezvous (highest random weight) hash of the prompt's first
  block (or the tenant): the same order for every router. A request whose prompt no
  replica holds yet and that names a ``prompt_cache_key`` (``metadata.user_id`` on
  Anthropic's API) is placed by the rendezvous hash of that key within its tenant first,
  free pages second: requests that share a key but not yet a cached prefix meet on one
  replica, as OpenAI's routing does with the key. Concurrent first requests of
  one prefix meet on one replica through the router's provisional index entries
  (``index.ClusterIndex.expect``), which count as cached until the events confirm them.
- A hard bound on top, on the same decayed counts: a replica that took more than
  ``(1 + LOAD_SLACK) * mean + LOAD_ROOM`` of the recent requests and has requests queued
  is not chosen while another is under it (consistent hashing with bounded loads,
  Mirrokni et al. 2018): no prefix makes one replica the fleet's queue. One that keeps up
  (nothing queued) is not a hot spot, and moving a long conversation off it only
  recomputes the prefix; nor is one whose hit saves more blocks, beyond the best hit
  under the bound, than the work queued there costs (``queue_cost`` per queued request):
  a spill is weighed in the same unit as the queue it avoids, so one queued request does
  not send a 300-block conversation elsewhere to be computed again.
- Retries (a replica refused or could not be reached) go to the others, least loaded first.

The constants (``HALF_LIFE``, ``LOAD_SLACK``, ``LOAD_ROOM``) were set on ``bench.cluster``
seeds 1 and 2 and are reported on other seeds, tenant counts and cache sizes
(``python -m bench.cluster --sweep``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

LOAD_SLACK = 0.25
LOAD_ROOM = 1.0  # requests over the bound's share (as in bounded loads: a ceiling of one)
HALF_LIFE = 64.0  # requests routed (by this router) over which a request's weight halves
OPENS, TURN = 1, 2  # a chat request with no assistant turn yet; one with an earlier answer
MAX_PER_OPENING = 32.0  # the most requests an opened conversation is counted ahead as
WITHDRAW_MEMORY = 4096  # recent requests whose kind ``RecentShare.withdraw`` remembers


@dataclass(frozen=True)
class Candidate:
    name: str  # the replica's URL
    load: float  # requests running and queued on it (retries go to the least loaded)
    cached_blocks: int  # how many of the prompt's leading blocks it holds
    free_pages: int = 0  # device pages it has free
    waiting: float = 0.0  # requests queued on it, not yet started
    recent: float = 0.0  # this router's recent requests sent to it (``RecentShare``)
    device_pages: int = 0  # its device pages in all (0: unknown)


def rendezvous(key: bytes, candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates in highest-random-weight order for ``key``: the same for every router."""
    return sorted(candidates, key=lambda c: xxhash.xxh64_intdigest(key + c.name.encode()),
                  reverse=True)


def mean_recent(candidates: Sequence[Candidate]) -> float:
    return sum(c.recent for c in candidates) / len(candidates)


def load_bound(candidates: Sequence[Candidate]) -> float:
    return (1.0 + LOAD_SLACK) * mean_recent(candidates) + LOAD_ROOM


class QueueCost:
    """The blocks a request had to prefill on the replica it was sent to, as a running
    mean: what one request's work is, in the cost's unit. Only requests a replica answered
    count (the router observes once the answer's status is known): a request it refused
    (too long, malformed, over a limit) did no work, and costs its sender nothing, so
    counting it would let one tenant raise every request's price of imbalance a
    thousandfold and so push every tenant's conversations off their cached prefixes."""

    def __init__(self, initial: float = 8.0, weight: float = 0.05) -> None:
        self.value = initial
        self.weight = weight

    def observe(self, uncached_blocks: int) -> None:
        self.value += self.weight * (max(1.0, float(uncached_blocks)) - self.value)


class RecentShare:
    """Requests this router sent to each replica, each weighing ``2 ** (-n / HALF_LIFE)``
    after ``n`` more were routed. Kept as one running scale, so a request costs O(1).

    Conversations are counted ahead: a chat request with no assistant turn yet opens one
    (``sent(..., turn=OPENS)``), and an opening stands for the requests its conversation
    will send, the router's recent mean per opening. ``load`` is the larger of a replica's
    requests and its openings so counted: a replica that has just opened conversations is
    as loaded as their later turns will make it, so the next new conversation goes
    elsewhere before, not after, those turns arrive (and are then pushed off their cached
    prefixes by the load bound). The router weighs a new conversation by ``load`` and
    every other request by ``of``: a later turn's own coming was already counted when its
    conversation opened, and is not held against it again."""

    def __init__(self, half_life: float = HALF_LIFE) -> None:
        self._decay = 2.0 ** (-1.0 / half_life)
        self._scale = 1.0  # the weight a request sent now has, in stored units
        self._stored: dict[str, float] = {}
        self._opened: dict[str, float] = {}  # openings, in the same units
        self._turns = 0.0  # chat requests (openings and later turns), all replicas
        self._opens = 0.0  # openings, all replicas
        self._count = 0  # requests counted so far
        self._kinds: dict[int, int] = {}  # number -> turn, for ``withdraw`` (recent ones)

    def of(self, name: str) -> float:
        return self._stored.get(name, 0.0) / self._scale

    def opened(self, name: str) -> float:
        return self._opened.get(name, 0.0) / self._scale

    def per_opening(self) -> float:
        """Requests a conversation sends, the recent mean: at least one, at most
        ``MAX_PER_OPENING`` (a tenant that sends one opening and then thousands of
        "later turns" must not make every opening weigh thousands)."""
        if self._opens <= 0:
            return 1.0
        return min(MAX_PER_OPENING, max(1.0, self._turns / self._opens))

    def load(self, name: str) -> float:
        """``name``'s share with its conversations counted ahead (the class's rule)."""
        return max(self.of(name), self.opened(name) * self.per_opening())

    def sent(self, name: str, turn: int = 0) -> int:
        """Count a request sent to ``name`` (``turn``: ``OPENS`` a conversation, a later
        ``TURN`` of one, or 0: not a conversation's); → its number, for ``withdraw``."""
        self._scale /= self._decay
        self._stored[name] = self._stored.get(name, 0.0) + self._scale
        self._count += 1
        if turn:
            self._turns += self._scale
            if turn == OPENS:
                self._opens += self._scale
                self._opened[name] = self._opened.get(name, 0.0) + self._scale
            self._kinds[self._count] = turn
            if len(self._kinds) > WITHDRAW_MEMORY:  # the oldest: long settled
                del self._kinds[next(iter(self._kinds))]
        if self._scale > 1e100:  # renormalise long before floats overflow
            k = self._scale
            self._stored = {n: v / k for n, v in self._stored.items()}
            self._opened = {n: v / k for n, v in self._opened.items()}
            self._turns, self._opens = self._turns / k, self._opens / k
            self._scale = 1.0
        return self._count

    def withdraw(self, name: str, number: int) -> None:
        """Take back request ``number`` (``sent``'s answer): it ran nothing there (the
        replica refused it), so it is not work that replica did, nor a conversation it
        opened. Its weight now is what ``sent`` added, decayed by the requests counted
        since."""
        weight = self._scale * self._decay ** (self._count - number)
        turn = self._kinds.pop(number, 0)
        stored = self._stored.get(name)
        if stored is None:
            return
        self._stored[name] = max(0.0, stored - weight)
        if turn:
            self._turns = max(0.0, self._turns - weight)
            if turn == OPENS:
                self._opens = max(0.0, self._opens - weight)
                self._opened[name] = max(0.0, self._opened.get(name, 0.0) - weight)


def pressure(c: Candidate) -> float:
    """The share of ``c``'s device pages in use: 1 when every new block evicts one."""
    if c.device_pages <= 0:
        return 0.0
    return min(1.0, max(0.0, 1.0 - c.free_pages / c.device_pages))


def cost(c: Candidate, prompt_blocks: int, queue_cost: float, mean: float = 0.0,
         fleet_waiting: float = 0.0) -> float:
    """Blocks of work the request means on ``c`` (the module's formula): its own prefill
    left and the work ``c`` took beyond its share (``mean``: the replicas' mean recent
    share), both dearer while the fleet queues (``fleet_waiting``: the replicas' mean);
    the cached blocks that prefill evicts once the pages are full; the requests queued
    ahead of it."""
    excess = max(0.0, c.recent - mean)
    uncached = max(0, prompt_blocks - c.cached_blocks)
    return ((1.0 + fleet_waiting) * (uncached + queue_cost * excess)
            + uncached * pressure(c) + queue_cost * c.waiting)


def choose(candidates: Sequence[Candidate], affinity_key: bytes, prompt_blocks: int = 0,
           queue_cost: float = 1.0, keyed: bool = False) -> list[Candidate]:
    """All candidates, the one to try first at the head. ``keyed``: the affinity key is
    the client's own (``prompt_cache_key``): among equal costs its rendezvous order decides
    before free pages do, so the requests that share a key meet on one replica."""
    if not candidates:
        return []
    order = rendezvous(affinity_key, candidates)
    bound = load_bound(candidates)
    mean = mean_recent(candidates)
    waiting = sum(c.waiting for c in candidates) / len(candidates)
    # over the bound *and* queueing: a replica that keeps up with more than its share is no
    # hot spot, and moving a long conversation off it would only recompute its prefix
    fits = [c for c in order if c.recent <= bound or c.waiting <= 0]
    # nor is one whose hit saves more than its queue costs: the blocks it holds beyond the
    # best of those under the bound outweigh the work queued ahead there (one queued
    # request did not move a 300-block conversation to recompute it all elsewhere)
    spare = max((c.cached_blocks for c in fits), default=0)
    under = ([c for c in order
              if c in fits or c.cached_blocks - spare > queue_cost * c.waiting]
             or [min(order, key=lambda c: c.recent)])
    blocks = max(prompt_blocks, max(c.cached_blocks for c in candidates))
    # min() keeps the first of equals: ties go by the rendezvous order
    first = min(under, key=lambda c: (round(cost(c, blocks, queue_cost, mean, waiting), 9),
                                      0 if keyed else -c.free_pages))
    rest = sorted((c for c in order if c is not first), key=lambda c: c.load)
    return [first, *rest]


