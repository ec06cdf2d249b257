"""The traces ``kvgate plan`` replays: Mooncake's format, or kvgate's own billing receipts.

- ``mooncake``: one JSON object a line with ``timestamp`` (ms), ``input_length`` and
  ``hash_ids`` (chained ids of 512-token blocks), as in ``bench/traces``; one tenant.
- ``receipts``: one billing receipt a line, as ``GET /v1/receipts/{id}`` answers it or as
  the ledger's ``receipts`` table holds it (its ``body`` column). A receipt names the chain
  hashes of the prompt blocks its request read from the cache and of those it wrote, in
  prompt order, with the tenant, the start time and the prompt's token count: the prompt's
  blocks are the read ones, then the written ones. Blocks it names neither way (shared
  with a request computing them at the same time, refused by a quota) are replayed as
  blocks no other request has, and a block first filled while decoding (an answer a later
  turn repeats) is written by no receipt, so its first read misses: the replay's hit rate
  errs low. Receipts name blocks of
  the gateway's ``--block-size``: plan with the same block size.
"""

from __future__ import annotations

import itertools
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from kvgate.cachestore.replay import Request, Trace, TraceError, mooncake_trace

FORMATS = ("auto", "mooncake", "receipts")
MAX_IDS = 2**32  # the store hashes ids as u32 tokens
MAX_PROMPT_BLOCKS = 1 << 20  # a longer prompt is no model's: refused, not replayed


def read_trace(path: Path, fmt: str, block_size: int, ttl_s: float,
               limit: int | None = None) -> Trace:
    """The trace at ``path`` in ``fmt`` (``auto``: by its first request's fields)."""
    if fmt not in FORMATS:
        raise TraceError(f"--trace-format {fmt!r}: use {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = _detect(path)
    if fmt == "mooncake":
        return mooncake_trace(path, limit, ttl_s)
    return receipts_trace(path, block_size, ttl_s, limit)


def _detect(path: Path) -> str:
    try:
        with path.open() as f:
            lineno, first = next(((n, line) for n, line in enumerate(f, 1) if line.strip()),
                                 (0, "null"))
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read the trace ({exc})") from None
    try:
        doc = json.loads(first)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
    if isinstance(doc, dict) and "hash_ids" in doc:
        return "mooncake"
    if isinstance(doc, dict) and doc.get("object") == "receipt":
        return "receipts"
    raise TraceError(f"{path}: neither a Mooncake trace (objects with hash_ids) nor kvgate "
                     "receipts (objects with \"object\": \"receipt\"), one JSON object a line")


def receipts_trace(path: Path, block_size: int, ttl_s: float,
                   limit: int | None = None) -> Trace:
    ids: dict[str, int] = {}  # block hash → dense id (what the store hashes)
    fresh = itertools.count()
    rows: list[tuple[datetime, Request]] = []
    try:
        with path.open() as f:
            for lineno, line in enumerate(itertools.islice(f, limit), 1):
                if line.strip():
                    rows.append(_receipt(f"{path}:{lineno}", line, block_size, ttl_s, ids,
                                         fresh))
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read the trace ({exc})") from None
    if not rows:
        raise TraceError(f"{path}: the trace holds no receipt")
    if next(fresh) >= MAX_IDS:
        raise TraceError(f"{path}: more than 2**32 distinct blocks; replay fewer receipts")
    rows.sort(key=lambda row: row[0])
    start = rows[0][0]
    requests = []
    for at, r in rows:
        r.time_s = (at - start).total_seconds()
        requests.append(r)
    return Trace(path.stem, 1, requests, block_size)


def _receipt(where: str, line: str, block_size: int, ttl_s: float, ids: dict[str, int],
             fresh: itertools.count[int]) -> tuple[datetime, Request]:
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not JSON ({exc.msg})") from None
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
    read = _hashes(where, blocks, "read")
    written = _hashes(where, blocks, "written")
    full = prompt // block_size
    if full > MAX_PROMPT_BLOCKS:
        raise TraceError(f"{where}: a prompt of {prompt} tokens is more than "
                         f"{MAX_PROMPT_BLOCKS} blocks of {block_size}")
    known = [h for h, _ in read + written]
    if len(known) > full:
        raise TraceError(f"{where}: the receipt names {len(known)} blocks, more than its "
                         f"{prompt} prompt tokens hold at --block-size {block_size}: plan "
                         "with the gateway's block size")
    chain = [ids.setdefault(h, next(fresh)) for h in known]
    chain += [next(fresh) for _ in range(full - len(known))]  # named neither way: one-offs
    ttls = [t for _, t in written if t is not None]
    ttl = float(max(ttls)) if ttls else ttl_s
    tenant = doc.get("tenant_id")
    return at, Request(0.0, f"tenant:{tenant}", np.asarray(chain, dtype=np.int64), ttl, chain,
                       prompt)


def _hashes(where: str, blocks: Any, kind: str) -> list[tuple[str, float | None]]:
    items = blocks.get(kind, []) if isinstance(blocks, dict) else None
    if not isinstance(items, list):
        raise TraceError(f"{where}: blocks.{kind} must be a list")
    out: list[tuple[str, float | None]] = []
    for b in items:
        h = b.get("hash") if isinstance(b, dict) else None
        ttl = b.get("ttl_s") if isinstance(b, dict) else None
        if not isinstance(h, str) or not h:
            raise TraceError(f"{where}: every block in blocks.{kind} needs its hash")
        if ttl is not None and (not isinstance(ttl, (int, float)) or isinstance(ttl, bool)
                                or not math.isfinite(ttl) or ttl <= 0):
            raise TraceError(f"{where}: blocks.{kind} has a ttl_s that is not a positive "
                             "number of seconds")
        out.append((h, ttl))
    return out
