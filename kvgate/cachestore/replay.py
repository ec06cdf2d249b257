"""Replaying a request trace through the real ``CacheStore``: what hit rate a cache of a
given size would have had, by running the store, not by a formula.

Requests are matched, allocated, committed and released in turn at their arrival times on
the store's clock (they never overlap), with a page of 4 bytes, so a replay of millions of
blocks allocates almost nothing; callers turn bytes into blocks with the real ``KVLayout``
first. A trace block is one store block whose "token" is the block's id (ids chain as
prefixes do); a request's ``fresh_blocks`` miss and are never stored. Trace files are
untrusted: ``trace_lines`` and ``json_line`` turn every bad line into a ``TraceError``
naming it, and readers refuse a trace of more than ``max_blocks`` blocks to store.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import torch

from kvgate.cachestore.store import CacheStore
from kvgate.kernels.layout import KVLayout

DEFAULT_TTL_S = 300.0
MOONCAKE_BLOCK_TOKENS = 512  # one Mooncake hash id stands for 512 prompt tokens
MAX_LINE_BYTES = 16 * 1024**2  # a receipt of a 1M-token prompt names ~6 MB of block hashes
DEFAULT_MAX_BLOCKS = 2_000_000  # blocks a trace may have stored: ~4 GB in the largest replay


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the file, line and why."""


@dataclass
class Request:
    time_s: float
    namespace: str
    tokens: np.ndarray  # what the store hashes: full blocks only, len % block_size == 0
    ttl_s: float
    blocks: list  # one identity per block (chained): what an offline optimum sees
    prompt_tokens: int | None = None  # real prompt tokens, partial last block included
    fresh_blocks: int = 0  # full blocks after ``blocks`` that no request has: never stored

    @property
    def num_blocks(self) -> int:
        """Full prompt blocks: the chain's and the fresh ones."""
        return len(self.blocks) + self.fresh_blocks


@dataclass
class Trace:
    name: str
    block_size: int  # store tokens per block (1: a block's "token" is its id)
    requests: list[Request]
    block_tokens: int = 0  # real tokens one block stands for (0: block_size)

    @property
    def tokens_per_block(self) -> int:
        return self.block_tokens or self.block_size

    def prompt_tokens(self, r: Request) -> int:
        return r.num_blocks * self.tokens_per_block if r.prompt_tokens is None else r.prompt_tokens

    @property
    def stored_blocks(self) -> int:
        """Blocks the replay stores, all requests together: more room never evicts."""
        return sum(len(r.blocks) for r in self.requests)


@dataclass
class Counts:
    hit_blocks: int = 0
    blocks: int = 0  # full prompt blocks
    cached_tokens: int = 0
    prompt_tokens: int = 0


@dataclass
class ReplayResult:
    """What the replay served, overall and per namespace."""

    by_namespace: dict[str, Counts] = field(default_factory=dict)

    @property
    def total(self) -> Counts:
        out = Counts()
        for c in self.by_namespace.values():
            out.hit_blocks += c.hit_blocks
            out.blocks += c.blocks
            out.cached_tokens += c.cached_tokens
            out.prompt_tokens += c.prompt_tokens
        return out

    def hit_rate(self, namespace: str = "") -> float:
        """Blocks served from the cache / full prompt blocks (``""``: all namespaces)."""
        c = self.by_namespace.get(namespace, Counts()) if namespace else self.total
        return c.hit_blocks / c.blocks if c.blocks else 0.0

    def read_share(self, namespace: str = "") -> float:
        """Prompt tokens read from the cache / all prompt tokens."""
        c = self.by_namespace.get(namespace, Counts()) if namespace else self.total
        return c.cached_tokens / c.prompt_tokens if c.prompt_tokens else 0.0


def replay(
    trace: Trace, device_blocks: int, host_blocks: int = 0, eviction: str = "adaptive",
    shares: bool = False, reserved: dict[str, int] | None = None,
) -> ReplayResult:
    """The real ``CacheStore`` with ``device_blocks`` and ``host_blocks`` blocks of room.
    ``shares``: fair shares for every active namespace (``--cache-shares``); ``reserved``:
    blocks reserved per namespace on each tier."""
    layout = KVLayout(1, 1, 1, trace.block_size, torch.float32)
    now = [0.0]
    ttl = max((r.ttl_s for r in trace.requests), default=DEFAULT_TTL_S)
    store = CacheStore(layout, device_blocks * layout.page_bytes, host_blocks * layout.page_bytes,
                       clock=lambda: now[0],
                       default_ttl_s=DEFAULT_TTL_S if ttl < math.inf else math.inf,
                       shares=shares, eviction=eviction)
    for ns, blocks in (reserved or {}).items():
        store.set_reservation(ns, blocks * layout.page_bytes, blocks * layout.page_bytes)
    out = ReplayResult()
    step = trace.tokens_per_block
    for i, r in enumerate(trace.requests):
        counts = out.by_namespace.setdefault(r.namespace, Counts())
        prompt = trace.prompt_tokens(r)
        counts.prompt_tokens += prompt
        counts.blocks += r.num_blocks  # fresh blocks: counted, never hit, never stored
        if not r.blocks:  # shorter than a block, or fresh blocks only: nothing to cache
            continue
        now[0] = r.time_s
        seq = store.open(str(i), r.namespace, default_ttl_s=r.ttl_s)
        m = store.match(seq, r.tokens)
        if store.allocate(seq, len(r.tokens)):
            counts.hit_blocks += m.num_blocks
            counts.cached_tokens += min(m.num_blocks * step, prompt)
            store.commit(seq, r.tokens)
        store.release(seq)
    return out


def blocks_for_bytes(layout: KVLayout, nbytes: int, block_tokens: int) -> int:
    """How many trace blocks of ``block_tokens`` tokens the pages of ``layout`` that fit in
    ``nbytes`` hold (a Mooncake block of 512 tokens is 32 pages of 16)."""
    return layout.pages_for_bytes(nbytes) * layout.block_size // block_tokens


def short(value: object, most: int = 40) -> str:
    """``value`` for an error message, cut to ``most`` characters: a trace is untrusted, and
    a number of thousands of digits or a long string is never echoed whole."""
    try:
        text = str(value)
    except ValueError:  # an int over the digit limit
        return "a number of thousands of digits"
    return text if len(text) <= most else text[: most - 3] + "..."


def trace_lines(path: Path, limit: int | None = None,
                max_line: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """The non-blank lines of the trace at ``path`` with their line numbers, the first
    ``limit`` of them. Only a regular file is read (a device or a pipe never ends), and a
    line longer than ``max_line`` bytes is refused, not read on."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # before opening: a FIFO's open blocks
            raise TraceError(f"{path}: not a regular file; give a trace file")
        with path.open("rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # replaced since the stat
                raise TraceError(f"{path}: not a regular file; give a trace file")
            lineno = found = 0
            while limit is None or found < limit:
                raw = f.readline(max_line + 1)
                if not raw:
                    return
                lineno += 1
                if len(raw.rstrip(b"\r\n")) > max_line:
                    raise TraceError(f"{path}:{lineno}: a line longer than {max_line} bytes")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise TraceError(f"{path}:{lineno}: not UTF-8 text") from None
                if line.strip():
                    found += 1
                    yield lineno, line
    except OSError as exc:
        raise TraceError(f"{path}: cannot read the trace ({exc.strerror or exc})") from None


def json_line(where: str, line: str) -> Any:
    """A trace line's JSON value; any way it fails to parse is a ``TraceError``."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not JSON ({exc.msg})") from None
    except ValueError:  # json.loads refuses ints of more than sys.get_int_max_str_digits()
        raise TraceError(f"{where}: not usable JSON (a number of too many digits)") from None
    except RecursionError:
        raise TraceError(f"{where}: not usable JSON (nested too deep)") from None


def too_many_blocks(path: Path, lineno: int, max_blocks: int) -> TraceError:
    return TraceError(f"{path}:{lineno}: the trace has more than {max_blocks} blocks to "
                      "replay (about 2 KB of memory each): raise --max-blocks or replay "
                      "fewer requests (--max-requests)")


def mooncake_trace(path: Path, limit: int | None = None, ttl_s: float = DEFAULT_TTL_S,
                   namespace: str = "tenant:mooncake",
                   max_blocks: int = DEFAULT_MAX_BLOCKS) -> Trace:
    """A Mooncake-format trace (one JSON object a line: ``timestamp`` in ms,
    ``input_length``, ``hash_ids`` of 512-token blocks) as one tenant. A trace block is one
    store block of one "token", its id; a partial last block is not cached but its tokens
    count in the prompt. ``limit``: the first requests only; more than ``max_blocks`` full
    blocks in all is refused."""
    requests: list[Request] = []
    blocks = 0
    for lineno, line in trace_lines(path, limit):
        r = _mooncake_request(path, lineno, line, ttl_s, namespace)
        blocks += len(r.blocks)
        if blocks > max_blocks:
            raise too_many_blocks(path, lineno, max_blocks)
        requests.append(r)
    if not requests:
        raise TraceError(f"{path}: the trace holds no request")
    requests.sort(key=lambda r: r.time_s)  # stable: arrival order kept among equal times
    return Trace(path.stem, 1, requests, MOONCAKE_BLOCK_TOKENS)


def _mooncake_request(path: Path, lineno: int, line: str, ttl_s: float,
                      namespace: str) -> Request:
    where = f"{path}:{lineno}"
    r = json_line(where, line)
    if not isinstance(r, dict):
        raise TraceError(f"{where}: a Mooncake request is a JSON object")
    stamp, length, ids = r.get("timestamp"), r.get("input_length"), r.get("hash_ids")
    if not finite(stamp) or stamp < 0:
        raise TraceError(f"{where}: timestamp must be a number of milliseconds >= 0")
    if type(length) is not int or length < 0:
        raise TraceError(f"{where}: input_length must be a whole number of tokens >= 0")
    if not isinstance(ids, list) or not all(type(i) is int and 0 <= i < 2**32 for i in ids):
        raise TraceError(f"{where}: hash_ids must be a list of integers in [0, 2**32)")
    if len(ids) < -(-length // MOONCAKE_BLOCK_TOKENS):
        raise TraceError(f"{where}: {len(ids)} hash_ids cannot cover input_length "
                         f"{short(length)} ({MOONCAKE_BLOCK_TOKENS} tokens a block)")
    full = ids[: length // MOONCAKE_BLOCK_TOKENS]
    return Request(float(stamp) / 1000.0, namespace, np.asarray(full, dtype=np.int64), ttl_s,
                   full, length)


def finite(value: object) -> TypeGuard[int | float]:
    """A JSON number (not a boolean) that is finite as a float: an int too large for one is
    not."""
    if not _number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
