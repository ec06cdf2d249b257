"""The routing decision: which replica gets a request, and in what order to try the rest.

- The replica holding the longest cached prefix of the prompt (for this tenant: the hashes
  are namespace-scoped) wins, unless its load is over the bound.
- With no hit anywhere, a rendezvous (highest random weight) hash of the prompt's first
  block (or the tenant, for prompts shorter than a block) orders the replicas, so
  concurrent first requests of one prefix meet on one replica and write it once: the
  replica under the bound with the most free device pages takes it, the first in that
  order among equals (consistent hashing with bounded loads, Mirrokni et al. 2018; free
  pages first because a new prefix stays where it lands, so that is where new tenants must
  spread; with every cache full the rendezvous order alone decides).
- The bound: ``(1 + LOAD_SLACK) * mean load + 1`` requests (running plus queued), so no
  replica runs far ahead of the others while prefix affinity is kept where it is cheap.
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


def choose(candidates: Sequence[Candidate], affinity_key: bytes) -> list[Candidate]:
    """All candidates, the one to try first at the head."""
    if not candidates:
        return []
    order = rendezvous(affinity_key, candidates)
    bound = load_bound(candidates)
    under = [c for c in order if c.load <= bound]
    if not under:
        first = min(order, key=lambda c: c.load)
    elif max(c.cached_blocks for c in under):
        # max() keeps the first of equals: ties in cached prefix go by the rendezvous order
        first = max(under, key=lambda c: c.cached_blocks)
    else:
        first = max(under, key=lambda c: c.free_pages)
    rest = sorted((c for c in order if c is not first), key=lambda c: c.load)
    return [first, *rest]
