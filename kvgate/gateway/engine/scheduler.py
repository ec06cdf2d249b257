"""Continuous batching: which tokens of which sequences the next step computes.

Each step has a token budget. Running decodes go first; a prompt longer than what is left
is computed in chunks over several steps; waiting requests are admitted in ``fairness``
key order while budget and pages last, their ``prompt[:-1]`` matched in the cache under
their namespace. Without pages, the running sequence with the worst key is preempted
(committed blocks stay cached) and queued again. One prefill per prefix: a running
sequence announces the blocks it will compute (``CacheStore.announce``), and a queued
request whose first uncached block is announced in its namespace waits (``_waits``), at
most ``single_flight_wait_steps`` steps, to read them from the cache.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from kvgate.cachestore import CacheStore
from kvgate.cachestore.pool import copy_pages
from kvgate.gateway.engine.config import EngineConfig
from kvgate.gateway.engine.fairness import DECODE, PREFILL, Fairness
from kvgate.gateway.engine.request import check_prompt
from kvgate.gateway.engine.sequence import Sequence, Status

QUEUED_HELD = 8  # waiting requests (from the head) whose cached prefixes are evicted last


@dataclass
class Chunk:
    """``length`` tokens of ``seq`` from position ``start``; samples if it ends the sequence."""

    seq: Sequence
    start: int
    length: int

    @property
    def samples(self) -> bool:
        return self.start + self.length == len(self.seq)


@dataclass
class SchedulerOutput:
    """One step's plan: the chunks to compute, the sequences the scheduler finished itself
    while planning (outgrown the whole pool), and those whose admission raised (taken off
    the queue, holding nothing), which the engine must report."""

    chunks: list[Chunk] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)

    num_tokens: int = 0

    def add(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        self.num_tokens += chunk.length

    def has(self, seq: Sequence) -> bool:
        return any(c.seq is seq for c in self.chunks)

    def drop(self, seq: Sequence) -> None:
        """A sequence preempted after it was given a chunk this step loses it."""
        kept = [c for c in self.chunks if c.seq is not seq]
        if len(kept) != len(self.chunks):
            self.chunks = kept
            self.num_tokens = sum(c.length for c in kept)


class Scheduler:
    def __init__(self, config: EngineConfig, store: CacheStore, max_model_len: int) -> None:
        self.config = config
        self.store = store
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.num_device_pages = int(store.device_pool.shape[0])
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.parked: list[Sequence] = []  # their clients stopped reading (``_park``)
        self.fairness = Fairness(config.fair_scheduling)
        self.num_preemptions = 0
        self.num_forks = 0  # choices that started on their parent's pages (n > 1)
        self.num_parked = 0  # times a sequence was parked
        self._newcomer_step = False  # the last step was light newcomers' alone
        # The bound's U (fairness.py): what one decision can charge an account
        self._slack = max(config.max_batch_tokens * PREFILL, config.max_running * DECODE)
        self._arrivals = 0

    # -- admission -------------------------------------------------------------------

    def check(self, num_prompt_tokens: int) -> None:
        """Reject a prompt that can never run, whatever else is going on."""
        check_prompt(num_prompt_tokens, self.max_model_len, self.block_size, self.num_device_pages)

    def add(self, seq: Sequence) -> None:
        self.check(seq.num_prompt_tokens)
        self._arrive(seq)
        self.waiting.append(seq)

    def _arrive(self, seq: Sequence) -> None:
        self._arrivals += 1
        seq.order = self._arrivals
        seq.arrived = True
        self.fairness.arrive(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def head(self) -> Sequence:
        """The waiting sequence that runs next (the smallest key)."""
        return min(self.waiting, key=self.fairness.key)

    # -- one step ----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """One step's chunks. Running sequences with one token to compute (decodes) go
        first, best key first, so they never starve; then prompts still being computed and
        waiting requests compete for the rest of the token budget in key order
        (``fairness.py``): a newcomer of an account that has had little service is
        admitted, and its prompt computed, before the chunks of a heavier account's long
        prompts."""
        limit = self.config.max_batch_tokens
        contended = (self.config.contended_batch_tokens and self.fairness.fair
                     and self.fairness.busy > 1)
        if contended:  # short steps while tenants compete (fairness.py)
            limit = min(limit, self.config.contended_batch_tokens)
        out = SchedulerOutput()
        self._park_and_resume()
        key = self.fairness.key
        light = self._light_newcomers() if contended else []
        self._newcomer_step = bool(light)
        if light:  # their first tokens in a step of their own (fairness.py)
            entries: list[Sequence] = light
        else:
            self._decodes(out, limit)
            if limit < self.config.max_batch_tokens:  # prompts get a quarter of it at least
                limit = max(limit, out.num_tokens + limit // 4)
            entries = [s for s in self.running if s.num_uncomputed > 1] + list(self.waiting)
        # The rest in key order. Counters only grow as work is charged, so a popped entry
        # whose key went stale is pushed back with its new key (it can only have worsened).
        heap = [(key(s), i, s) for i, s in enumerate(entries)]
        heapq.heapify(heap)
        admitting = True  # until the best waiting request cannot get pages
        while heap and (budget := limit - out.num_tokens) > 0:
            k, i, seq = heapq.heappop(heap)
            now = key(seq)
            if now != k:
                heapq.heappush(heap, (now, i, seq))
                continue
            if seq.status is Status.RUNNING:
                if out.has(seq):  # preempted and admitted again this step
                    continue
                n = min(seq.num_uncomputed, budget)
                if self._grow(seq, seq.num_computed + n, out):
                    out.add(Chunk(seq, seq.num_computed, n))
                    self._charge(seq, n)
                continue
            if not admitting or seq.status is not Status.WAITING:
                continue
            cap = seq.request.max_running
            if cap and self.fairness.account(seq).running >= cap:
                continue  # its account runs all it may; the others go on
            try:
                if self._waits(seq):
                    continue
                if (len(self.running) >= self.config.max_running
                        and not self._displace(seq, out)):
                    admitting = False
                    continue
                chunk = self._admit(seq, limit - out.num_tokens)
                while chunk is None and self._displace(seq, out):
                    chunk = self._admit(seq, limit - out.num_tokens)
            except Exception as exc:  # this request's own (its tokens): it alone fails
                self.waiting.remove(seq)
                out.failed.append((seq, exc))
                continue
            if chunk is None:
                admitting = False  # the best request waits for pages; nobody jumps it
                continue
            self.waiting.remove(seq)
            out.add(chunk)
            self._charge(seq, chunk.length)
        # the cached prefixes the next admissions will match go last (CacheStore.hold_queued)
        self.store.hold_queued({s.seq_id: (s.request.namespace, s.token_ids)
                                for s in heapq.nsmallest(QUEUED_HELD, self.waiting, key=key)})
        return out

    def _decodes(self, out: SchedulerOutput, limit: int) -> None:
        """A token each for the running sequences that decode, best key first."""
        block = self.block_size
        roomy: set[str] = set()  # namespaces of decodes whose pages hold their next token
        for seq in sorted((s for s in self.running if s.num_uncomputed <= 1),
                          key=self.fairness.key):
            if out.num_tokens >= limit:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted below by a better sequence of this step
            handle = seq.handle
            if handle is not None and seq.num_computed < len(handle.block_table) * block:
                roomy.add(seq.request.namespace)  # no page to take: nothing to allocate
            elif not self._grow(seq, seq.num_computed + 1, out):
                continue
            out.add(Chunk(seq, seq.num_computed, 1))
            self._charge(seq, 1)
        if roomy:
            self.store.touch(roomy)

    def _light_newcomers(self) -> list[Sequence]:
        """Waiting requests that get a step of their own: each is new (never admitted), of
        an account with nothing running, in a priority class no worse and with a counter no
        larger than every running account's. Never two such steps in a row, so the
        running sequences lose at most every other step to them."""
        if self._newcomer_step or not self.running:
            return []
        fair = self.fairness
        busy = [fair.key(s) for s in self.running]
        floor = min(busy)[:2]
        return [s for s in self.waiting
                if s.admissions == 0 and fair.account(s).running == 0
                and fair.key(s)[:2] <= floor]

    def _charge(self, seq: Sequence, n: int) -> None:
        """The account pays for ``n`` tokens computed this step (a decode, or a chunk)."""
        if n == 1 and seq.num_output:
            self.fairness.charge(seq, decode=1)
        else:
            self.fairness.charge(seq, prefill=n)

    def _displace(self, cand: Sequence, out: SchedulerOutput) -> bool:
        """Preempts, of the running sequences the fairness rules let ``cand`` displace
        (``Fairness.may_displace``), the one with the worst key; whether one was."""
        fair = self.fairness
        victims = [r for r in self.running if fair.may_displace(cand, r)]
        if not victims:
            return False
        victim = max(victims, key=fair.key)
        self.preempt(victim)
        out.drop(victim)
        self.fairness.preemptions += 1
        return True

    def _park_and_resume(self) -> None:
        """A streaming request whose client has left ``max_unread_tokens`` token events
        unread is parked: its running sequences give up their slot and pages (full blocks
        stay cached) until the client has read half of them; then they queue again and
        resume mostly from the cache. The gateway's write timeout ends the ones that never
        read again."""
        limit = self.config.max_unread_tokens
        if not limit:
            return
        for seq in [s for s in self.running if s.request.stream and s.flow.unread >= limit]:
            self._stop_running(seq)
            seq.status = Status.PARKED
            self.parked.append(seq)
            self.num_parked += 1
        for seq in [s for s in self.parked if s.flow.unread <= limit // 2]:
            self.parked.remove(seq)
            seq.status = Status.WAITING
            self.waiting.append(seq)

    def _stop_running(self, seq: Sequence) -> None:
        """Takes ``seq`` off the running list and frees its pages (its blocks stay cached);
        it computes its tokens again (mostly from the cache) when it next runs."""
        self.running.remove(seq)
        self.fairness.account(seq).running -= 1
        if seq.handle is not None:
            self.store.release(seq.handle)
        seq.handle = None
        seq.num_computed = 0

    def _start_running(self, seq: Sequence) -> None:
        seq.status = Status.RUNNING
        self.running.append(seq)
        self.fairness.account(seq).running += 1

    def _grow(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Pages for ``num_tokens``; preempts newer sequences (or ``seq`` itself) to get them."""
        assert seq.handle is not None, "a running sequence holds its cache handle"
        while not self.store.allocate(seq.handle, num_tokens):
            victim = max(self.running, key=self.fairness.key)
            if victim is seq and len(self.running) == 1:
                # Alone and still too big: it has outgrown the whole pool.
                self.finish(seq, "length")
                out.finished.append(seq)
                return False
            self.preempt(victim)
            out.drop(victim)
            if victim is seq:
                return False
        return True

    def _hashes(self, seq: Sequence) -> list[bytes]:
        """The chain hashes of the sequence's full blocks, made once per length."""
        if seq.hashed_len != len(seq.token_ids):
            seq.block_hashes = self.store.block_hashes(seq.request.namespace, seq.token_ids)
            seq.hashed_len = len(seq.token_ids)
        return seq.block_hashes

    def _waits(self, seq: Sequence) -> bool:
        """Whether ``seq`` waits this step: the first block of its prompt not cached yet
        (of those it would match: ``token_ids[:-1]``) is being computed by a running
        sequence of its namespace, and it has waited fewer steps than the bound."""
        limit = self.config.single_flight_wait_steps
        if limit == 0 or seq.waited_steps > limit:
            return False
        found = self.store.in_flight(seq.request.namespace, self._hashes(seq),
                                     (len(seq) - 1) // self.block_size,
                                     seq.wait_from_block or 0)
        if found is None:
            return False
        if seq.waited_steps == limit:  # the bound: computes the rest itself from now on
            seq.waited_steps += 1
            self.store.record_wait(timed_out=True)
            return False
        if seq.wait_from_block is None:
            seq.wait_from_block = found[0]
        if seq.waited_steps == 0:
            self.store.record_wait(waited=True)
        seq.waited_steps += 1
        return True

    def _admit(self, seq: Sequence, budget: int) -> Chunk | None:
        req = seq.request
        seq.admissions += 1
        handle = self.store.open(
            f"{seq.seq_id}#{seq.admissions}",
            req.namespace,
            ttl_segments=list(req.ttl_segments),
            default_ttl_s=req.default_ttl_s,
        )
        admitted = False
        try:
            match = self.store.match(handle, seq.token_ids[:-1])
            cached = int(match.num_cached_tokens)
            n = min(len(seq) - cached, budget)
            hashes = self._hashes(seq) if self.config.single_flight_wait_steps else None
            room = self.store.allocate(handle, cached + n)
            if room and hashes is not None:  # what queued requests may wait for
                self.store.announce(handle, hashes)
            admitted = room
        finally:
            if not admitted:  # no room, or it raised: hold nothing
                self.store.release(handle)
                seq.admissions -= 1
        if not admitted:
            return None
        if seq.wait_from_block is not None:  # it waited: the blocks read instead of computed
            saved = cached - seq.wait_from_block * self.block_size
            seq.wait_from_block = None
            if saved > 0:
                self.store.record_wait(saved_tokens=saved)
        if seq.admissions == 1 and seq.index == 0:  # the prompt is billed once, with choice 0
            seq.cached_tokens = min(cached, seq.num_prompt_tokens)
            seq.read_blocks = list(match.blocks)
            self.store.record_prompt(req.namespace, seq.num_prompt_tokens, seq.cached_tokens)
        self.fairness.admitted(seq, self._slack)
        if seq.admissions == 1:
            self.fairness.charge(seq, cached=cached)
        seq.handle = handle
        seq.num_computed = cached
        seq.num_committed_blocks = cached // self.block_size
        self._start_running(seq)
        return Chunk(seq, cached, n)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Run ``child`` (the prompt and its own first token) on ``parent``'s computed
        prompt: the full pages are shared through the cache (the parent has committed them),
        the partial last page is copied, so no prompt token is computed twice. Without room
        the child waits and is admitted like any request (its prompt then hits the cache)."""
        assert parent.handle is not None, "a parent forks while it holds its pages"
        prompt_len = child.num_prompt_tokens
        self._arrive(child)
        child.order = parent.order
        cap = child.request.max_running
        capped = bool(cap) and self.fairness.account(child).running >= cap
        if len(self.running) < self.config.max_running and not capped:
            child.admissions += 1
            req = child.request
            handle = self.store.open(f"{child.seq_id}#{child.admissions}", req.namespace,
                                     ttl_segments=list(req.ttl_segments),
                                     default_ttl_s=req.default_ttl_s)
            admitted = False
            try:
                cached = int(self.store.match(handle, child.token_ids[:prompt_len]).num_cached_tokens)
                admitted = self.store.allocate(handle, len(child))
                full = prompt_len // self.block_size
                if admitted and cached == full * self.block_size < prompt_len:
                    copy_pages(self.store.device_pool, self.store.device_pool,
                               [parent.handle.block_table[full]], [handle.block_table[full]])
                    cached = prompt_len
            finally:
                if not admitted:
                    self.store.release(handle)
                    child.admissions -= 1
            if admitted:
                child.handle = handle
                child.num_computed = cached
                child.num_committed_blocks = cached // self.block_size
                self._start_running(child)
                self.num_forks += 1
                return
        self.waiting.appendleft(child)

    # -- after the step ------------------------------------------------------------------

    def commit(self, seq: Sequence) -> None:
        """Index every newly filled block; bill as cache writes only blocks of the prompt
        filled before any output existed (decode-filled blocks are billed as output), each
        once: a prompt preempted part-way whose blocks were evicted before it came back
        writes them again, and the tenant is not billed for that twice, nor for writing a
        block it was billed as reading."""
        full = seq.num_computed // self.block_size
        if full <= seq.num_committed_blocks or seq.handle is None:
            return
        before = len(seq.handle.written)
        self.store.commit(seq.handle, seq.token_ids[: full * self.block_size])
        seq.num_committed_blocks = full
        if seq.num_output == 0:
            billed = ({h for h, _ in seq.written_blocks} | {h for h, _ in seq.read_blocks}
                      if seq.admissions > 1 else set())
            for h, ttl_s in seq.handle.written[before:]:
                if h in billed:
                    continue
                ttl = round(ttl_s)
                seq.cache_writes[ttl] = seq.cache_writes.get(ttl, 0) + self.block_size
                seq.written_blocks.append((h, ttl))

    def preempt(self, seq: Sequence) -> None:
        self._stop_running(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Frees everything the sequence holds, whatever state it is in."""
        if seq.status is Status.RUNNING:
            self._stop_running(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        elif seq.status is Status.PARKED and seq in self.parked:
            self.parked.remove(seq)
        if seq.handle is not None:
            self.store.release(seq.handle)
            seq.handle = None
        if seq.arrived:
            seq.arrived = False
            self.fairness.leave(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
