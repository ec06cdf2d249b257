"""The hit rate a trace would get at each cache size and KV dtype, by replaying it through
the real ``CacheStore`` (``kvgate.cachestore.replay``).

A size is the device tier's bytes; the host tier keeps the bytes it was given. Each is
turned into blocks with the dtype's ``KVLayout``, so an FP8 page (about half a 16-bit
one) buys about twice the blocks. Sizes that come to the same blocks are replayed once,
and no tier is given more blocks than the trace has (it would never evict).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from kvgate.cachestore.replay import ReplayResult, Trace, blocks_for_bytes, replay
from kvgate.kernels.layout import KVLayout


@dataclass(frozen=True)
class SweepRow:
    kv_dtype: str
    device_cache_bytes: int
    host_cache_bytes: int
    device_blocks: int  # trace blocks (of ``TraceReport.block_tokens`` tokens) each tier holds
    host_blocks: int
    hit_rate: float  # blocks read from the cache / full prompt blocks
    cache_read_share: float  # prompt tokens read from the cache / all prompt tokens


@dataclass(frozen=True)
class TraceReport:
    name: str
    requests: int
    prompt_tokens: int
    block_tokens: int
    rows: tuple[SweepRow, ...]
    unbounded_hit_rate: float  # a cache that never evicts (TTLs still expire)
    unbounded_read_share: float

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows"] = [asdict(r) for r in self.rows]
        return out


_TRACE: Trace | None = None  # a worker process's copy (``_init``)


def _init(trace: Trace) -> None:
    global _TRACE
    _TRACE = trace


def _replay(capacity: tuple[int, int]) -> tuple[tuple[int, int], ReplayResult]:
    assert _TRACE is not None
    return capacity, replay(_TRACE, *capacity)


def sweep(trace: Trace, layouts: dict[str, KVLayout], sizes: list[int], host_bytes: int,
          workers: int = 1, progress: Callable[[int, int], None] | None = None) -> TraceReport:
    step = trace.tokens_per_block
    most = trace.stored_blocks  # more room than this never evicts

    def blocks(layout: KVLayout, nbytes: int) -> int:
        return min(blocks_for_bytes(layout, nbytes, step), most)

    plan = [(name, size, blocks(layout, size), blocks(layout, host_bytes))
            for name, layout in layouts.items() for size in sizes]
    wanted = sorted({(d, h) for _, _, d, h in plan} | {(most, 0)}, reverse=True)
    got: dict[tuple[int, int], ReplayResult] = {}
    if workers > 1 and len(wanted) > 1:
        with ProcessPoolExecutor(min(workers, len(wanted)), initializer=_init,
                                 initargs=(trace,)) as pool:
            for capacity, result in pool.map(_replay, wanted):
                got[capacity] = result
                if progress:
                    progress(len(got), len(wanted))
    else:
        for capacity in wanted:
            got[capacity] = replay(trace, *capacity)
            if progress:
                progress(len(got), len(wanted))
    rows = tuple(SweepRow(name, size, host_bytes, d, h, round(got[d, h].hit_rate(), 4),
                          round(got[d, h].read_share(), 4)) for name, size, d, h in plan)
    unbounded = got[most, 0]
    return TraceReport(trace.name, len(trace.requests), unbounded.total.prompt_tokens, step,
                       rows, round(unbounded.hit_rate(), 4), round(unbounded.read_share(), 4))
