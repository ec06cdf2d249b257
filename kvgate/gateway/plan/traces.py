"""The traces ``kvgate plan`` replays: Mooncake's format, or kvgate's own billing receipts.

- ``mooncake``: one JSON object a line with ``timestamp`` (ms), ``input_length`` and
  ``hash_ids`` (chained ids of 512-token blocks), as in ``bench/traces``; one tenant.
- ``receipts``: one billing receipt a line, as ``GET /v1/receipts/{id}`` answers it or as
  the ledger's ``receipts`` table holds it (its ``body`` column). A receipt names the chain
  hashes of the prompt blocks its request read from the cache and of those it wrote, in
  prompt order, with the tenant, the start time and the prompt's token count: the prompt's
  blocks are the read ones, then the written ones. Blocks it names neither way (shared
  with a request computing them at the same time, refused by a quota) are replayed as
  blocks no other request has (counted as misses, not stored: the gateway did not store
  them for this request either), and a block first filled while decoding (an answer a later
  turn repeats) is written by no receipt, so its first read misses: the replay's hit rate
  errs low. Receipts name blocks of
  the gateway's ``--block-size``: plan with the same block size.

A trace is untrusted: lines are read with ``replay.trace_lines`` (regular files, bounded
lines), a trace with more than ``max_blocks`` blocks to store is refused, and running out
of memory while reading one is a ``TraceError`` too.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from kvgate.cachestore.replay import (
    DEFAULT_MAX_BLOCKS,
    Request,
    Trace,
    TraceError,
    finite,
    json_line,
    mooncake_trace,
    short,
    too_many_blocks,
    trace_lines,
)

FORMATS = ("auto", "mooncake", "receipts")
MAX_IDS = 2**32  # the store hashes ids as u32 tokens
MAX_PROMPT_BLOCKS = 1 << 20  # a longer prompt is no model's: refused, not replayed
MAX_HASH_CHARS = 128  # a block hash in hex (the gateway's are 64)
MAX_TENANT_CHARS = 256


def read_trace(path: Path, fmt: str, block_size: int, ttl_s: float,
               limit: int | None = None, max_blocks: int = DEFAULT_MAX_BLOCKS) -> Trace:
    """The trace at ``path`` in ``fmt`` (``auto``: by its first request's fields), its
    first ``limit`` requests; more than ``max_blocks`` blocks to store is refused."""
    if fmt not in FORMATS:
        raise TraceError(f"--trace-format {short(fmt)!r}: use {', '.join(FORMATS)}")
    try:
        if fmt == "auto":
            fmt = _detect(path)
        if fmt == "mooncake":
            return mooncake_trace(path, limit, ttl_s, max_blocks=max_blocks)
        return receipts_trace(path, block_size, ttl_s, limit, max_blocks)
    except MemoryError:
        raise TraceError(f"{path}: out of memory reading the trace; replay fewer requests "
                         "(--max-requests) or blocks (--max-blocks)") from None


def _detect(path: Path) -> str:
    lineno, first = next(trace_lines(path, 1), (0, "null"))
    doc = json_line(f"{path}:{lineno}", first)
    if isinstance(doc, dict) and "hash_ids" in doc:
        return "mooncake"
    if isinstance(doc, dict) and doc.get("object") == "receipt":
        return "receipts"
    raise TraceError(f"{path}: neither a Mooncake trace (objects with hash_ids) nor kvgate "
                     "receipts (objects with \"object\": \"receipt\"), one JSON object a line")


def receipts_trace(path: Path, block_size: int, ttl_s: float,
                   limit: int | None = None, max_blocks: int = DEFAULT_MAX_BLOCKS) -> Trace:
    ids: dict[str, int] = {}  # block hash → dense id (what the store hashes)
    rows: list[tuple[datetime, Request]] = []
    stored = 0
    for lineno, line in trace_lines(path, limit):
        at, r = _receipt(f"{path}:{lineno}", line, block_size, ttl_s, ids)
        stored += len(r.blocks)
        if stored > max_blocks:
            raise too_many_blocks(path, lineno, max_blocks)
        rows.append((at, r))
    if not rows:
        raise TraceError(f"{path}: the trace holds no receipt")
    if len(ids) >= MAX_IDS:
        raise TraceError(f"{path}: more than 2**32 distinct blocks; replay fewer receipts")
    rows.sort(key=lambda row: row[0])
    start = rows[0][0]
    requests = []
    for at, r in rows:
        r.time_s = (at - start).total_seconds()
        requests.append(r)
    return Trace(path.stem, 1, requests, block_size)


def _receipt(where: str, line: str, block_size: int, ttl_s: float,
             ids: dict[str, int]) -> tuple[datetime, Request]:
    doc = json_line(where, line)
    if not isinstance(doc, dict) or doc.get("object") != "receipt":
        raise TraceError(f"{where}: not a kvgate receipt (\"object\": \"receipt\")")
    tokens, blocks = doc.get("tokens"), doc.get("blocks")
    prompt = tokens.get("prompt") if isinstance(tokens, dict) else None
    if type(prompt) is not int or prompt < 0:
        raise TraceError(f"{where}: tokens.prompt must be a whole number >= 0")
    try:
        at = datetime.fromisoformat(str(doc.get("started_at")))
        if at.tzinfo is None:
            raise ValueError("no time zone")
    except ValueError:
        raise TraceError(f"{where}: started_at must be an ISO 8601 time with its zone") from None
    tenant = doc.get("tenant_id")
    if not (tenant is None or (type(tenant) is int)
            or (isinstance(tenant, str) and len(tenant) <= MAX_TENANT_CHARS)):
        raise TraceError(f"{where}: tenant_id must be a tenant id (a number)")
    full = prompt // block_size
    if full > MAX_PROMPT_BLOCKS:
        raise TraceError(f"{where}: a prompt of {short(prompt)} tokens is more than "
                         f"{MAX_PROMPT_BLOCKS} blocks of {block_size}")
    read = _hashes(where, blocks, "read")
    written = _hashes(where, blocks, "written")
    known = [h for h, _ in read + written]
    if len(known) > full:
        raise TraceError(f"{where}: the receipt names {len(known)} blocks, more than its "
                         f"{short(prompt)} prompt tokens hold at --block-size {block_size}: plan "
                         "with the gateway's block size")
    chain = [ids.setdefault(h, len(ids)) for h in known]
    ttls = [t for _, t in written if t is not None]
    ttl = float(max(ttls)) if ttls else ttl_s
    # blocks named neither way are one-offs: counted as misses, never stored
    return at, Request(0.0, f"tenant:{tenant}", np.asarray(chain, dtype=np.int64), ttl, chain,
                       prompt, full - len(known))


def _hashes(where: str, blocks: Any, kind: str) -> list[tuple[str, float | None]]:
    items = blocks.get(kind, []) if isinstance(blocks, dict) else None
    if not isinstance(items, list):
        raise TraceError(f"{where}: blocks.{kind} must be a list")
    out: list[tuple[str, float | None]] = []
    for b in items:
        h = b.get("hash") if isinstance(b, dict) else None
        ttl = b.get("ttl_s") if isinstance(b, dict) else None
        if not isinstance(h, str) or not h or len(h) > MAX_HASH_CHARS:
            raise TraceError(f"{where}: every block in blocks.{kind} needs its hash "
                             f"(at most {MAX_HASH_CHARS} characters)")
        if ttl is not None and (not finite(ttl) or ttl <= 0):
            raise TraceError(f"{where}: blocks.{kind} has a ttl_s that is not a positive "
                             "number of seconds")
        out.append((h, ttl))
    return out
