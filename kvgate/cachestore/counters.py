"""The store's running counters, one named field per figure ``/admin/cache/stats`` reports.

The owner thread adds to them under the store's lock; ``CacheStore.stats()`` hands out a
copy (``snapshot``), so a reader never holds an object the owner still mutates.

Hit and miss tokens are counted per request, by ``CacheStore.record_prompt``, from the
same figures the request is billed with, so over any period hit + miss equals the prompt
tokens billed. ``match`` cannot count them: it sees ``prompt[:-1]``, and sees the prompt
again after a preemption.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class Evictions:
    """Blocks that left the cache, by why; a block dropped with its parent counts too.

    A device eviction that lands on the host is a demotion, not an eviction; ``flush`` is
    an operator action and counts as neither.
    """

    lru: int = 0  # no room: the policy's victim (and, on the device, no room on the host)
    ttl: int = 0  # idle past its expiry
    quota: int = 0  # its namespace was over quota

    def as_dict(self) -> dict[str, int]:
        return {"lru": self.lru, "ttl": self.ttl, "quota": self.quota}


@dataclass
class PageMoves:
    """Pages copied from one tier to the other (promotions or demotions)."""

    count: int = 0
    bytes: int = 0

    def add(self, pages: int, page_bytes: int) -> None:
        self.count += pages
        self.bytes += pages * page_bytes

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "bytes": self.bytes}


@dataclass
class PromptTokens:
    """One namespace's prompt tokens, as billed."""

    hit: int = 0  # prompt tokens served from the cache
    miss: int = 0  # prompt tokens computed, cache writes included


@dataclass
class SingleFlight:
    """Requests that waited for another running request of their namespace to compute the
    prompt blocks they were about to compute (``Scheduler``, one prefill per prefix)."""

    waited: int = 0  # requests that waited at least one step
    timed_out: int = 0  # of those, waits that reached the bound (they computed the rest)
    saved_tokens: int = 0  # prompt tokens they read from the cache thanks to the wait

    def as_dict(self) -> dict[str, int]:
        return {"waited": self.waited, "timed_out": self.timed_out,
                "saved_tokens": self.saved_tokens}


@dataclass
class CacheCounters:
    evictions: Evictions = field(default_factory=Evictions)
    promotions: PageMoves = field(default_factory=PageMoves)
    demotions: PageMoves = field(default_factory=PageMoves)
    prompts: dict[str, PromptTokens] = field(default_factory=dict)
    single_flight: SingleFlight = field(default_factory=SingleFlight)

    def record_prompt(self, namespace: str, prompt_tokens: int, cached_tokens: int) -> None:
        if not 0 <= cached_tokens <= prompt_tokens:
            raise ValueError(
                f"cached_tokens ({cached_tokens}) must be within [0, prompt_tokens "
                f"({prompt_tokens})]"
            )
        tokens = self.prompts.setdefault(namespace, PromptTokens())
        tokens.hit += cached_tokens
        tokens.miss += prompt_tokens - cached_tokens

    def snapshot(self) -> CacheCounters:
        """A copy that shares nothing mutable with these counters."""
        return CacheCounters(
            replace(self.evictions),
            replace(self.promotions),
            replace(self.demotions),
            {ns: replace(tokens) for ns, tokens in self.prompts.items()},
            replace(self.single_flight),
        )
