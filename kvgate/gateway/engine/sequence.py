"""One request as the scheduler sees it: its tokens, how far its KV is computed, its pages.

``token_ids`` is prompt + output. ``num_computed`` counts the leading tokens whose K/V sit
in the sequence's pages; the next step computes ``token_ids[num_computed:]`` (or a chunk
of it). After a preemption ``num_computed`` drops to 0 and the prompt *and* the output so
far are recomputed (their prefix may hit the cache again).
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from kvgate.cachestore import CacheSeq
from kvgate.gateway.engine.request import EngineEvent, GenerateRequest, TokenEvent
from kvgate.gateway.engine.tokenizer import IncrementalDecoder, TextTokenizer
from kvgate.gateway.usage import CacheDetail, Usage

if TYPE_CHECKING:
    import llguidance


class PageRow:
    """A sequence's block table as a growing int32 array, synced from its cache handle by
    appending the pages added since the last step (a new handle, after a preemption,
    starts it again). The cache store only ever appends to a handle's table or replaces
    the whole list; a rewritten last page is caught and the row rebuilt."""

    def __init__(self) -> None:
        self.array = np.zeros(16, dtype=np.int32)
        self.size = 0
        self.source: list[int] | None = None
        self.last = -1  # the table's last page as synced (a plain int: compared each step)
        self.view = self.array[:0]  # array[:size], kept: most steps change nothing

    def sync(self, table: list[int]) -> np.ndarray:
        n = len(table)
        if table is self.source and n == self.size and (not n or table[n - 1] == self.last):
            return self.view  # the usual decode step: no page added
        if (table is not self.source or n < self.size
                or (self.size and table[self.size - 1] != self.last)):
            self.source, self.size = table, 0
        if n > self.size:
            if n > len(self.array):
                grown = np.zeros(max(n, 2 * len(self.array)), dtype=np.int32)
                grown[: self.size] = self.array[: self.size]
                self.array = grown
            self.array[self.size : n] = table[self.size :]
            self.size = n
        self.last = table[n - 1] if n else -1
        self.view = self.array[: self.size]
        return self.view


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PARKED = "parked"  # its client is not reading: holds no slot and no pages
    FINISHED = "finished"


class Flow:
    """A request's token events sent by the engine thread and taken by its reader (the
    asyncio side): their difference is what the client has not read yet. Each counter has
    one writer."""

    __slots__ = ("consumed", "emitted")

    def __init__(self) -> None:
        self.emitted = 0
        self.consumed = 0

    @property
    def unread(self) -> int:
        return self.emitted - self.consumed


class Sequence:
    def __init__(self, request: GenerateRequest, tokenizer: TextTokenizer,
                 arrival: float | None = None, index: int = 0):
        self.request = request
        self.request_id = request.request_id
        # Choice ``index`` of the request's n; choices after the first are forked from it
        # once its prompt is computed (``Engine._fork``), so they share its prefill.
        self.index = index
        self.seq_id = request.request_id if index == 0 else f"{request.request_id}/{index}"
        self.forked = False  # choice 0 of n > 1: its followers exist
        self.params = request.sampling
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self._history = np.empty(0, dtype=np.int64)  # ``history()``'s buffer
        self._history_len = 0
        self.num_computed = 0
        self.num_committed_blocks = 0  # full blocks already handed to store.commit
        self.status = Status.WAITING
        self.handle: CacheSeq | None = None  # the cachestore's state while admitted
        # Fair scheduling: the arrival rank (kept through preemptions, so a preempted
        # sequence goes before its account's later ones) and whether the account counts it
        self.order = 0
        self.arrived = False
        self.flow = Flow()  # shared by the request's choices
        self.admissions = 0
        # One prefill per prefix (``Scheduler._waits``): the chain hashes of ``token_ids``'
        # full blocks (for ``len(token_ids)`` tokens), the steps spent waiting for another
        # sequence's blocks, and the first block it waited for (None: not waiting now).
        self.block_hashes: list[bytes] = []
        self.hashed_len = -1
        self.waited_steps = 0
        self.wait_from_block: int | None = None
        # The stream this sequence draws from (``sampler.uniforms``): the request's seed
        # (plus the choice index), or a random one; draw i is the i-th output token's.
        seed = self.params.seed_of(index)
        self.seed: int = random.getrandbits(64) if seed is None else seed
        # The runner's copy of ``handle.block_table`` (appended to, never rebuilt)
        self.pages = PageRow()
        self.decoder = IncrementalDecoder(tokenizer)  # used when ``params.reads_text``
        self.emitted_chars = 0  # of decoder.text, already sent to the client
        # The prompt's cache split, fixed at the first admission (a recompute after a
        # preemption is the engine's cost, not the client's).
        self.cached_tokens = 0
        self.cache_writes: dict[int, int] = {}  # TTL seconds -> prompt tokens written
        # The blocks behind those two counts (``CacheDetail``): read, with their tier;
        # written, with their TTL in seconds
        self.read_blocks: list[tuple[bytes, str]] = []
        self.written_blocks: list[tuple[bytes, int]] = []
        self.arrival = time.monotonic() if arrival is None else arrival
        self.first_token_at: float | None = None
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None  # the stop string that ended the output
        self.emit: Callable[[EngineEvent], None] = lambda event: None  # set by the facade
        self.held: list[TokenEvent] = []  # not yet sent (requests that do not stream)
        # Structured outputs: this sequence's grammar state (``GrammarEngine.of`` makes it)
        self.grammar: llguidance.LLMatcher | None = None

    def usage(self) -> Usage:
        """The usage so far: the prompt's split is final once the first token exists."""
        return Usage(self.num_prompt_tokens, self.cached_tokens, self.cache_writes,
                     self.num_output)

    def cache_detail(self) -> CacheDetail:
        """The blocks the prompt's billed split stands for (fixed with it)."""
        return CacheDetail(tuple(self.read_blocks), tuple(self.written_blocks))

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def history(self) -> np.ndarray:
        """``token_ids`` as an int64 array (what the sampler's penalties count), kept in
        step with the list by copying only the ids appended since the last call: one
        token a step, not the whole history."""
        n, m = self._history_len, len(self.token_ids)
        if m > len(self._history):
            grown = np.empty(max(2 * len(self._history), m + 64), dtype=np.int64)
            grown[:n] = self._history[:n]
            self._history = grown
        if m > n:
            self._history[n:m] = self.token_ids[n:m]
            self._history_len = m
        return self._history[:m]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED


def append_token(seq: Sequence, token_id: int, eos_token_ids: list[int], max_len: int,
                 complete: bool = False) -> tuple[str, str | None]:
    """Add a sampled token; returns (text to send now, finish reason or None).
    ``complete``: the sequence's grammar is complete, nothing may follow (``stop``).

    Only an output whose end depends on its text (``params.reads_text``) is detokenized
    here; any other gets "" and its text is made from the ids where it is read
    (``tokenizer.TextStream``), off the engine's step.

    Stop strings are searched in the detokenized text; text that could still become the
    start of a stop string is held back, and text from a stop string on is never sent. The
    stop string that ends the output is kept in ``seq.stop_sequence``. With
    ``params.repeat_block``, a block still open is held back too, and a block that repeats
    an earlier one ends the output where it begins (``stop``; it is never sent); a block
    the token limit cuts is dropped (``stop`` if what it wrote repeats an earlier block).
    """
    params = seq.params
    seq.token_ids.append(token_id)
    reason: str | None = None
    ends = params.ends_on(token_id, eos_token_ids)
    if not params.reads_text:  # ids decide the end; the reader detokenizes (``TextStream``)
        if ends or complete:
            reason = "stop"
        elif seq.num_output >= params.max_tokens or len(seq.token_ids) >= max_len:
            reason = "length"
        return "", reason
    decoder = seq.decoder
    if ends:
        reason = "stop"
        decoder.flush()
    else:
        decoder.push(token_id)
        found = _find_stop(decoder.text, params.stop, seq.emitted_chars)
        if found is None and (complete or seq.num_output >= params.max_tokens
                              or len(seq.token_ids) >= max_len):
            reason = "stop" if complete else "length"
            decoder.flush()  # the held end of the text may complete a stop string
            found = _find_stop(decoder.text, params.stop, seq.emitted_chars)
        if found is not None:
            cut, seq.stop_sequence = found
            decoder.text = decoder.text[:cut]
            reason = "stop"
        elif params.repeat_block is not None:  # one walk over the blocks per token
            closed, open_at = _blocks(decoder.text, params.repeat_block)
            repeat = _repeated_block(decoder.text, closed, seq.emitted_chars)
            if repeat is not None:
                decoder.text = decoder.text[:repeat]
                reason = "stop"
            else:
                sendable = _sendable(decoder.text, params.repeat_block[0], closed, open_at)
    text = decoder.text
    if reason == "length" and params.repeat_block is not None:
        # A call the limit cut is never sent as text: it is dropped, and if what was
        # written of it repeats an earlier call, the answer ended there (``stop``).
        cut = max(seq.emitted_chars, sendable)
        if cut < len(text):
            tail = text[cut:]
            if tail.startswith(params.repeat_block[0]) and any(
                    text[a:b].startswith(tail) for a, b in closed):
                reason = "stop"
            decoder.text = text = text[:cut]
    if reason is not None:
        end = len(text)
    else:
        hold = max((len(s) for s in params.stop), default=1) - 1
        end = max(seq.emitted_chars, len(text) - hold)
        if params.repeat_block is not None:
            end = max(seq.emitted_chars, min(end, sendable))
    delta = text[seq.emitted_chars : end]
    seq.emitted_chars = end
    return delta, reason


def _find_stop(text: str, stops: list[str], emitted: int) -> tuple[int, str] | None:
    """The earliest start of a stop string that ends in text not yet sent, and that string
    (on a tie, the one listed first)."""
    best: tuple[int, str] | None = None
    for s in stops:
        if not s:
            continue
        i = text.find(s, max(0, emitted - len(s) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def _blocks(text: str, markers: tuple[str, str]) -> tuple[list[tuple[int, int]], int | None]:
    """The closed blocks of ``text`` as a tool parser reads them (a block opens at the first
    opening marker after the previous block, and closes at the first closing marker after
    that: an opening marker inside a block is the block's text), and where the block still
    open begins (None: none is)."""
    opening, closing = markers
    closed: list[tuple[int, int]] = []
    i = 0
    while (start := text.find(opening, i)) >= 0:
        end = text.find(closing, start + len(opening))
        if end < 0:
            return closed, start
        i = end + len(closing)
        closed.append((start, i))
    return closed, None


def _repeated_block(text: str, closed: list[tuple[int, int]], emitted: int) -> int | None:
    """Where the last closed block begins, when it closed in text not yet sent and an
    earlier block of ``text`` is the same."""
    if not closed or closed[-1][1] <= emitted:
        return None
    start, end = closed[-1]
    last = text[start:end]
    return start if any(text[a:b] == last for a, b in closed[:-1]) else None


def _sendable(text: str, opening: str, closed: list[tuple[int, int]],
              open_at: int | None) -> int:
    """How much of ``text`` may be sent: up to a block not yet closed, or to a tail that
    may begin one."""
    if open_at is not None:
        return open_at
    tail_from = closed[-1][1] if closed else 0
    for n in range(min(len(text) - tail_from, len(opening) - 1), 0, -1):
        if opening.startswith(text[-n:]):
            return len(text) - n
    return len(text)
