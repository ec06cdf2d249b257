"""The routing decision: which replica gets a request, and in what order to try the rest.

Each replica is scored by what the request would cost there, in blocks of prefill work:

    cost = (prompt blocks - blocks it holds) + queue_cost * load

- The first term is the prefill it would still have to do: the longer the cached prefix
  (for this tenant: the hashes are namespace-scoped), the less.
- The second is the wait behind the requests already running and queued there: ``load``
  of them, each costing about ``queue_cost`` blocks (the router's running mean of the
  blocks its requests had to prefill, ``QueueCost``). So a long hit keeps a conversation
  where it is while that replica is only a little busier; when it is much busier the
  request spills to another replica, which then warms (from the shared tier where there
  is one) and takes the next turns; a new prefix, or a freshly restarted empty replica,
  gets the least loaded.
- Among equal costs the replica with the most free device pages wins (a new prefix stays
  where it lands), then a rendezvous (highest random weight) hash of the prompt's first
  block (or the tenant): the same order for every router. A request whose prompt no
  replica holds yet and that names a ``prompt_cache_key`` (``metadata.user_id`` on
  Anthropic's API) is placed by the rendezvous hash of that key within its tenant first,
  free pages second: requests that share a key but not yet a cached prefix meet on one
  replica, as OpenAI's routing does with the key. Concurrent first requests of
  one prefix meet on one replica through the router's provisional index entries
  (``index.ClusterIndex.expect``), which count as cached until the events confirm them.
- A hard bound on top: a replica over ``(1 + LOAD_SLACK) * mean load + 1`` requests is
  not chosen while another is under it (consistent hashing with bounded loads, Mirrokni
  et al. 2018).
- Retries (a replica refused or could not be reached) go to the others, least loaded first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

LOAD_SLACK = 0.25


@dataclass(frozen=True)
class Candidate:
    name: str  # the replica's URL
    load: float  # requests running and queued on it
    cached_blocks: int  # how many of the prompt's leading blocks it holds
    free_pages: int = 0  # device pages it has free


def rendezvous(key: bytes, candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates in highest-random-weight order for ``key``: the same for every router."""
    return sorted(candidates, key=lambda c: xxhash.xxh64_intdigest(key + c.name.encode()),
                  reverse=True)


def load_bound(candidates: Sequence[Candidate]) -> float:
    mean = sum(c.load for c in candidates) / len(candidates)
    return (1.0 + LOAD_SLACK) * mean + 1.0


class QueueCost:
    """The blocks a request had to prefill on the replica it was sent to, as a running
    mean: what one request ahead in a replica's queue costs the next one."""

    def __init__(self, initial: float = 8.0, weight: float = 0.05) -> None:
        self.value = initial
        self.weight = weight

    def observe(self, uncached_blocks: int) -> None:
        self.value += self.weight * (max(1.0, float(uncached_blocks)) - self.value)


def cost(c: Candidate, prompt_blocks: int, queue_cost: float) -> float:
    """Blocks of work the request meets on ``c``: its own prefill left, and the queue's."""
    return max(0, prompt_blocks - c.cached_blocks) + queue_cost * c.load


def choose(candidates: Sequence[Candidate], affinity_key: bytes, prompt_blocks: int = 0,
           queue_cost: float = 1.0, keyed: bool = False) -> list[Candidate]:
    """All candidates, the one to try first at the head. ``keyed``: the affinity key is
    the client's own (``prompt_cache_key``): among equal costs its rendezvous order decides
    before free pages do, so the requests that share a key meet on one replica."""
    if not candidates:
        return []
    order = rendezvous(affinity_key, candidates)
    bound = load_bound(candidates)
    under = [c for c in order if c.load <= bound] or [min(order, key=lambda c: c.load)]
    blocks = max(prompt_blocks, max(c.cached_blocks for c in candidates))
    # min() keeps the first of equals: ties go by the rendezvous order
    first = min(under, key=lambda c: (cost(c, blocks, queue_cost),
                                      0 if keyed else -c.free_pages))
    rest = sorted((c for c in order if c is not first), key=lambda c: c.load)
    return [first, *rest]
