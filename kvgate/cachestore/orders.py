"""The eviction orders, one class each: which idle entry of a cache goes first.

``EvictionPolicy`` follows one over each tier's idle blocks; the duel's ``ShadowCache``
runs each over sampled hashes. Both keep the same segments (``Segments``) and ask the
order for its victims, first to go first. docs/architecture.md (Eviction order) says why
these three.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping, Reversible
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
Key = tuple[int, int, int]  # an entry's place in the whole order (``EvictionOrder.keyed``)

STALE_S = 120.0  # ``newest``: fresh entries idle longer than this go first, oldest first


@dataclass(frozen=True)
class Segments(Generic[K]):
    """A cache's idle entries, each sequence oldest first. ``recency``: all of them by last
    use; ``probation``: never reused; ``protected``: reused. ``group``: a probation entry's
    release group (entries released together share one; later groups are higher, and run
    deepest block first); ``since``: when an entry became idle."""

    recency: Iterable[K]
    probation: Reversible[K]
    protected: Iterable[K]
    group: Mapping[K, int]
    since: Mapping[K, float]


class EvictionOrder:
    name: ClassVar[str]
    # a reused entry (a hit, or a ghost written again) moves to ``protected``
    segmented: ClassVar[bool] = True
    # orders fresh entries by release group: ``keyed`` needs the first fresh one's position
    by_group: ClassVar[bool] = False

    def victims(self, s: Segments[K], horizon: float) -> Iterator[K]:
        """Every idle entry, first to go first; ``horizon``: entries idle since before it
        are stale (``newest``)."""
        raise NotImplementedError

    def keyed(self, s: Segments[K], stamp: Mapping[K, int], rstamp: Mapping[K, int],
              fresh: int | None) -> Iterator[tuple[Key, K]]:
        """``victims`` of a part of the entries (one namespace's), each with its place in
        the whole order, so streams of several parts merge into the whole order.
        ``stamp``: an entry's position in its segment, ``rstamp``: in recency (both grow
        as entries are added); ``fresh``: the position of the first probation entry idle
        since after the horizon (None: all are stale)."""
        raise NotImplementedError


class LRU(EvictionOrder):
    """Least recently used first, nothing else."""

    name = "lru"
    segmented = False

    def victims(self, s: Segments[K], horizon: float) -> Iterator[K]:
        yield from s.recency

    def keyed(self, s: Segments[K], stamp: Mapping[K, int], rstamp: Mapping[K, int],
              fresh: int | None) -> Iterator[tuple[Key, K]]:
        for entry in s.recency:
            yield (0, rstamp[entry], 0), entry


class SLRU(EvictionOrder):
    """Segmented LRU: never reused entries before reused ones, each least recently used
    first."""

    name = "slru"

    def victims(self, s: Segments[K], horizon: float) -> Iterator[K]:
        yield from s.probation
        yield from s.protected

    def keyed(self, s: Segments[K], stamp: Mapping[K, int], rstamp: Mapping[K, int],
              fresh: int | None) -> Iterator[tuple[Key, K]]:
        for entry in s.probation:
            yield (0, stamp[entry], 0), entry
        for entry in s.protected:
            yield (2, stamp[entry], 0), entry


class Newest(EvictionOrder):
    """As ``slru``, but stale never-reused entries go first, oldest first, then the fresh
    ones newest group first (within a group, as released: deepest first)."""

    name = "newest"
    by_group = True

    def victims(self, s: Segments[K], horizon: float) -> Iterator[K]:
        first_fresh = None
        for entry in s.probation:
            if s.since[entry] > horizon:
                first_fresh = entry
                break
            yield entry
        if first_fresh is not None:
            run: list[K] = []
            group = -1
            for entry in reversed(s.probation):
                g = s.group[entry]
                if g != group and run:
                    yield from reversed(run)
                    run = []
                group = g
                run.append(entry)
                if entry is first_fresh:
                    break
            yield from reversed(run)
        yield from s.protected

    def keyed(self, s: Segments[K], stamp: Mapping[K, int], rstamp: Mapping[K, int],
              fresh: int | None) -> Iterator[tuple[Key, K]]:
        if fresh is None:  # all stale: oldest first
            for entry in s.probation:
                yield (0, stamp[entry], 0), entry
        else:
            for entry in s.probation:  # stale, before the first fresh entry: oldest first
                if stamp[entry] >= fresh:
                    break
                yield (0, stamp[entry], 0), entry
            run: list[K] = []  # then newest group first (groups run in order)
            group = -1
            for entry in reversed(s.probation):
                if stamp[entry] < fresh:
                    break
                g = s.group[entry]
                if g != group and run:
                    for e in reversed(run):
                        yield (1, -group, stamp[e]), e
                    run = []
                group = g
                run.append(entry)
            for e in reversed(run):
                yield (1, -group, stamp[e]), e
        for entry in s.protected:
            yield (2, stamp[entry], 0), entry


ORDERS: dict[str, EvictionOrder] = {o.name: o for o in (LRU(), SLRU(), Newest())}
