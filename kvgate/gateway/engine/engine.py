"""The engine facade: one thread owns the model and the cache; asyncio talks to it.

Only the engine thread runs the model, and it makes the ``CacheStore``'s changes (the
scheduler's match, allocate, commit and release; admin calls through ``_call``). Other
threads call the store too, under its lock (``store._lock``): metrics scrapes
(``cache_stats``), the console's hottest prefixes, the router's snapshot, and the remote
tiers' fetch before admission. The asyncio side submits through a thread-safe queue and
receives events through ``loop.call_soon_threadsafe`` into one ``asyncio.Queue`` per
request; it never waits on the model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar

import torch

from kvgate.cachestore import CacheStats, CacheStore
from kvgate.cachestore.block import Tier
from kvgate.cachestore.disk_tier import DiskTierUnavailable
from kvgate.cachestore.events import CacheEventSink
from kvgate.cachestore.stats import HotPrefix
from kvgate.gateway.engine import sampler
from kvgate.gateway.engine.commands import Add, Call, Cancel, Command, Stop
from kvgate.gateway.engine.config import EngineConfig
from kvgate.gateway.engine.grammar import GrammarEngine
from kvgate.gateway.engine.loader import LoadedModel, head_dim_of, load_model
from kvgate.gateway.engine.remote import RemoteTierClient
from kvgate.gateway.engine.request import (
    EngineError,
    EngineEvent,
    EngineMisconfigured,
    ErrorEvent,
    FinishEvent,
    GenerateRequest,
    InvalidGrammar,
    PromptTooLong,
    TokenEvent,
    check_request,
    read_events,
)
from kvgate.gateway.engine.runner import ModelRunner
from kvgate.gateway.engine.sampler import SampleRow, TokenLogprob
from kvgate.gateway.engine.scheduler import Chunk, Scheduler
from kvgate.gateway.engine.sequence import Flow, Sequence, append_token
from kvgate.gateway.engine.tokenizer import TextStream
from kvgate.gateway.usage import Usage
from kvgate.kernels.layout import KVLayout, dtype_name

log = logging.getLogger("kvgate.engine")

T = TypeVar("T")


class Engine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        loaded = loaded or load_model(config)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.model_id
        self.model_info = dict(loaded.info)
        cfg = self.model.config
        device = next(self.model.parameters()).device
        kv_dtype, offload_dtype = config.kv_dtypes(next(self.model.parameters()).dtype)
        self.layout = KVLayout(
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim_of(cfg),
            block_size=config.block_size,
            dtype=kv_dtype,
        )
        self.block_size, self.page_bytes = config.block_size, self.layout.page_bytes
        host_layout = dataclasses.replace(self.layout, dtype=offload_dtype)
        self.store = CacheStore(
            self.layout,
            config.device_cache_bytes,
            config.host_cache_bytes,
            device=str(device),
            model_id=self.model_id,
            default_ttl_s=config.default_cache_ttl_seconds,
            shares=config.cache_shares,
            host_layout=host_layout,
        )
        device_pages = int(self.store.device_pool.shape[0])
        host_pages = int(self.store.host_pool.shape[0])
        if device_pages == 0:
            raise EngineMisconfigured(
                f"--device-cache-bytes {config.device_cache_bytes} holds no KV page "
                f"(one page is {self.layout.page_bytes} bytes)"
            )
        context = int(self.model_info["context_length"])
        self.max_model_len = min(config.max_model_len or context, context)
        room = device_pages * config.block_size  # tokens one sequence can hold at most
        if config.max_model_len and self.max_model_len > room:
            raise EngineMisconfigured(
                f"--max-model-len {config.max_model_len} does not fit the device KV cache: "
                f"--device-cache-bytes {config.device_cache_bytes} holds {room} tokens "
                f"({device_pages} pages of {config.block_size}); raise --device-cache-bytes "
                "or lower --max-model-len")
        if self.max_model_len > room:
            log.warning("the device KV cache holds %d tokens, fewer than the model's context "
                        "of %d: a sequence that outgrows it ends with finish_reason length",
                        room, self.max_model_len)
        # the tiers below the host: the local disk, then the remote (Valkey) tier
        self.remote: RemoteTierClient | None = None
        if config.remote_tier is not None or config.disk_tier is not None:
            try:
                self.remote = RemoteTierClient(config.remote_tier, self.store, host_layout,
                                               self.model, self.model_id, device,
                                               disk=config.disk_tier)
            except DiskTierUnavailable as exc:
                raise EngineMisconfigured(str(exc)) from exc
        self.model_info["context_length"] = self.max_model_len
        self.tokenizer.max_tokens = self.max_model_len  # longer texts are refused untokenized
        self.model_info.update(
            block_size=config.block_size, page_bytes=self.layout.page_bytes,
            device_pages=device_pages, host_pages=host_pages,
            kv_dtype=dtype_name(kv_dtype), offload_kv_dtype=dtype_name(offload_dtype),
            host_page_bytes=host_layout.page_bytes,
        )
        log.info(
            "KV pool: device %d pages of %d bytes (%s), host %d pages of %d bytes (%s), "
            "%d tokens per page",
            device_pages, self.layout.page_bytes, dtype_name(kv_dtype), host_pages,
            host_layout.page_bytes, dtype_name(offload_dtype), config.block_size,
        )
        # Token ids the model can embed (its embedding may have more rows than the tokenizer).
        self.vocab_size = int(cfg.vocab_size)
        self.scheduler = Scheduler(config, self.store, self.max_model_len)
        self.runner = ModelRunner(self.model, self.store.device_pool, self.layout,
                                  self.max_model_len, cuda_graphs=config.cuda_graphs,
                                  max_graph_batch=config.max_running)
        # Structured outputs: grammars compiled against this tokenizer, masks per step
        self.grammars = GrammarEngine(
            self.tokenizer.tokenizer.to_str(), self.tokenizer.eos_token_ids,
            max(self.vocab_size, self.tokenizer.vocab_size), threads=config.threads())
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._seqs: dict[str, Sequence] = {}  # by seq_id; engine thread only
        self._active: set[str] = set()  # asyncio side: request ids with an open stream
        self._thread: threading.Thread | None = None
        self._engine_ident: int | None = None  # the engine thread's, once it runs
        self._outbox: dict[asyncio.AbstractEventLoop,
                           list[tuple[asyncio.Queue[EngineEvent], EngineEvent]]] = {}
        # Called on the engine thread after each step's events are handed over (the core
        # process sends them to its API servers from here: engine/core.py)
        self.after_step: Callable[[], None] | None = None
        # submitted - picked up = waiting in the inbox; each counter has one writer thread
        self._submitted = 0
        self._picked_up = 0

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kvgate-engine", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._inbox.put(Stop())
            await asyncio.get_running_loop().run_in_executor(None, thread.join)
        if self.remote is not None:
            self.remote.close()

    # -- the asyncio side -------------------------------------------------------------

    def render_chat(self, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, tools=tools)

    def check(self, request: GenerateRequest) -> None:
        """Raises what ``request.check_request`` raises, before anything is queued."""
        check_request(request, max_model_len=self.max_model_len,
                      block_size=self.block_size,
                      device_pages=self.scheduler.num_device_pages, vocab_size=self.vocab_size,
                      compile_grammar=self.grammars.compile, queue_depth=self.queue_depth(),
                      max_queue=self.config.max_queue)

    async def submit(self, request: GenerateRequest, emit: Callable[[EngineEvent], None]
                     ) -> Flow:
        """Check ``request`` (raising as ``check`` does), adopt what the remote tiers hold
        of its prefix, and queue it; its events go to ``emit`` (on the engine thread once it
        runs). → its flow counter, which the reader advances per token read."""
        if self._thread is None:
            raise RuntimeError("Engine.start() has not been awaited")
        self.check(request)
        if self.remote is not None:  # blocks the remote tier holds: adopted before the Add
            adopt = await self.remote.prefetch(request)
            if adopt is not None:
                self._inbox.put(Call(adopt))
        seq = Sequence(request, self.tokenizer)
        seq.emit = emit
        self._submitted += 1
        self._inbox.put(Add(seq))
        return seq.flow

    async def generate(self, request: GenerateRequest
                       ) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
        """Token events, then one ``FinishEvent``. Leaving the loop early cancels the request."""
        if request.request_id in self._active:
            raise ValueError(f"request id {request.request_id!r} is already generating")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[EngineEvent] = asyncio.Queue()

        def emit(ev: EngineEvent) -> None:
            if threading.get_ident() == self._engine_ident:
                # one wake-up of the event loop per step, not one per token (_flush)
                self._outbox.setdefault(loop, []).append((events, ev))
                return
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, ev)

        flow = await self.submit(request, emit)
        rid = request.request_id
        self._active.add(rid)

        def on_token(ev: TokenEvent) -> None:
            flow.consumed += 1  # read: the engine may resume a parked sequence

        try:
            async with contextlib.aclosing(read_events(
                    events, request.sampling.n, on_token, lambda: self.cancel(rid),
                    None if request.sampling.reads_text
                    else TextStream(self.tokenizer, request.sampling).text)) as it:
                async for ev in it:
                    yield ev
        finally:
            self._active.discard(rid)

    def cancel(self, request_id: str) -> None:
        self._inbox.put(Cancel(request_id))

    def nudge(self) -> None:
        """Wake the engine thread for one turn of its loop (``after_step`` runs)."""
        self._inbox.put(Call(_nothing))

    def run_soon(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the engine thread, not waiting for it (a failure is logged)."""
        self._inbox.put(Call(fn))

    async def flush(self, namespace: str) -> int:
        return await self._call(lambda: self.store.flush(namespace))

    def set_quota(self, namespace: str, nbytes: int | None) -> None:
        self._inbox.put(Call(lambda: self.store.set_quota(namespace, nbytes)))

    def set_reservation(self, namespace: str, device_bytes: int | None,
                        host_bytes: int | None) -> None:
        self._inbox.put(Call(lambda: self.store.set_reservation(namespace, device_bytes,
                                                                host_bytes)))

    async def pin(self, namespace: str, token_ids: list[int], key: str) -> int:
        """Pin this prefix under ``key`` (blocks not cached yet are pinned as they are
        written); → blocks of it pinned now."""
        return await self._call(lambda: self.store.pin(namespace, token_ids, key))

    async def unpin(self, namespace: str, key: str) -> None:
        await self._call(lambda: self.store.unpin(namespace, key))

    async def pinned_blocks(self, namespace: str) -> int:
        return await self._call(lambda: self.store.pinned_blocks(namespace))

    async def reservations(self) -> dict[str, dict[str, int]]:
        """Reserved bytes per namespace and tier, as this replica's tiers hold them."""
        return await self._call(self.store.reservations)

    async def _call(self, fn: Callable[[], T]) -> T:
        """Runs ``fn`` on the engine thread (the store's owner) and waits for its result."""
        if self._thread is None:
            return fn()
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._inbox.put(Call(fn, fut))
        return await asyncio.wrap_future(fut)

    async def snapshot(self) -> tuple[int, list[tuple[str, bytes, Tier]]]:
        """The last cache event's number and every indexed block as (namespace, block hash,
        tier): what a router loads when it missed events."""
        seq, blocks = await asyncio.get_running_loop().run_in_executor(None, self.store.snapshot)
        return seq, [(b.namespace, b.block_hash, b.tier) for b in blocks]

    async def hottest(self, namespace: str, limit: int) -> list[HotPrefix]:
        """The namespace's most-hit prefixes (``CacheStore.hottest``), off the event loop."""
        return await asyncio.to_thread(self.store.hottest, namespace, limit)

    async def load(self) -> dict[str, int]:
        """What a router weighs: queue, running, free and total device pages, and the last
        cache event's number (int reads: no lock)."""
        store = self.store
        return {"queue_depth": self.queue_depth(), "running": self.num_running(),
                "free_pages": store.device.num_free, "device_pages": store.device.num_pages,
                "event_seq": store.index.event_seq}

    def set_event_sink(self, sink: CacheEventSink | None) -> None:
        """Each cache event (stored, removed, moved) goes to ``sink``, on the thread that
        changed the index."""
        self.store.index.on_event = sink

    restarts = 0  # an engine in this process is never restarted (EngineClient counts its core's)

    @property
    def up(self) -> bool:
        """Serving (``EngineClient``: False while its core process is restarting)."""
        return True

    async def refresh(self) -> None:
        """Nothing to fetch: ``cache_stats`` and ``scheduling`` read this process's figures
        (``EngineClient.refresh`` fetches them from the core)."""

    def tier_bytes(self) -> dict[str, int]:
        """Each tier's capacity in bytes (fixed at start)."""
        store = self.store
        return {"device": store.device.num_pages * store.device.page_bytes,
                "host": store.host.num_pages * store.host.page_bytes}

    def cache_stats(self) -> CacheStats:
        """The store's figures read from the calling thread: for metrics scrapes, where a
        figure a step old is fine. ``stats()`` reads them on the engine thread."""
        return self.store.stats()

    async def stats(self) -> CacheStats:
        return await self._call(self.store.stats)

    def queue_depth(self) -> int:
        return len(self.scheduler.waiting) + self._submitted - self._picked_up

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def scheduling(self) -> dict[str, Any]:
        """The scheduler's figures, read from the calling thread (a step old at most):
        every account's counter and service, preemptions, parked sequences."""
        s = self.scheduler
        return {"fair": s.fairness.fair, "running": len(s.running), "waiting": len(s.waiting),
                "parked": len(s.parked), "preemptions": s.num_preemptions,
                "fairness_preemptions": s.fairness.preemptions, "parks": s.num_parked,
                "accounts": s.fairness.snapshot()}

    # -- the engine thread -------------------------------------------------------------

    def _flush(self) -> None:
        """Hand this step's events to their event loops: one ``call_soon_threadsafe`` per
        loop (each wakes the loop through a pipe write; per token, a batch of 16 decoding
        sequences woke the server 16 times a step, time the model run then lacked)."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
                loop.call_soon_threadsafe(_deliver, items)
        if self.after_step is not None:
            self.after_step()

    def _loop(self) -> None:
        self._engine_ident = threading.get_ident()
        try:
            self._run_loop()
        finally:
            self._flush()

    def _run_loop(self) -> None:
        torch.set_num_threads(self.config.threads())
        while True:
            self._flush()
            block = not self.scheduler.has_work()
            try:
                # parked sequences resume when their clients read: look again shortly
                cmd = self._inbox.get(block=block,
                                      timeout=0.02 if block and self.scheduler.parked else None)
                while True:
                    if isinstance(cmd, Stop):
                        self._shutdown()
                        return
                    self._handle(cmd)
                    cmd = self._inbox.get_nowait()
            except queue.Empty:
                pass
            if self.scheduler.has_work() or self.scheduler.parked:
                try:
                    self.step()
                except Exception as exc:  # a bug outside the model run: fail all, keep serving
                    log.exception("engine step failed outside the model run")
                    for seq in list(self._seqs.values()):
                        try:
                            self._fail(seq, exc)
                        except Exception:  # its pages could not be released: still tell it
                            self._seqs.pop(seq.seq_id, None)
                            seq.emit(ErrorEvent(exc))

    def _handle(self, cmd: Add | Cancel | Call) -> None:
        if isinstance(cmd, Add):
            self._picked_up += 1
            try:
                self.scheduler.add(cmd.seq)
            except PromptTooLong as exc:
                cmd.seq.emit(ErrorEvent(exc))
                return
            self._seqs[cmd.seq.seq_id] = cmd.seq
        elif isinstance(cmd, Cancel):  # every choice of the request
            for seq in [s for s in self._seqs.values() if s.request_id == cmd.request_id]:
                self._finish(seq, "cancelled")
        else:
            # A caller that gave up (its task was cancelled) cancelled the future: the call
            # is not run, and nothing is set on it (that would raise here, on the engine
            # thread). Once running, the future can no longer be cancelled.
            if cmd.future is not None and not cmd.future.set_running_or_notify_cancel():
                return
            try:
                result = cmd.fn()
            except Exception as exc:  # the caller gets it; a fire-and-forget call is logged
                if cmd.future is None:
                    log.exception("engine call failed")
                else:
                    cmd.future.set_exception(exc)
            else:
                if cmd.future is not None:
                    cmd.future.set_result(result)

    def step(self) -> None:
        """Schedule, run the model once, sample, emit events.

        A failure fails only the sequence it belongs to: its admission, its part of the
        forward (found by retrying the batch in halves), or its own sampling, detokenizing,
        stop check and events. The step goes on for the others.
        """
        plan = self.scheduler.schedule()
        for seq in plan.finished:
            self._report_finish(seq)
        for seq, exc in plan.failed:
            log.error("request %s failed at admission: %r", seq.request_id, exc)
            self._fail(seq, exc)
        chunks = plan.chunks
        if not chunks:
            if not self.scheduler.running and self.scheduler.waiting:
                # Nothing runs and the head still cannot get pages: it never will.
                seq = self.scheduler.head()
                if seq.num_output:  # preempted after it had grown past what the pool can hold
                    self._finish(seq, "length")
                else:
                    self._fail(seq, PromptTooLong("the prompt does not fit in the device KV cache"))
            return
        computed = self._forward(chunks)
        self.grammars.apply(computed)  # structured outputs: masks, one op per logits tensor
        takers: list[tuple[Sequence, torch.Tensor, Sequence | None]] = []
        for chunk, logits in computed:
            try:
                takers.extend(self._postprocess(chunk, logits))
            except Exception as exc:
                log.exception("request %s failed after the model step", chunk.seq.request_id)
                self._fail(chunk.seq, exc)
        if takers:
            self._take_all(takers, time.monotonic())

    def _forward(self, chunks: list[Chunk]) -> list[tuple[Chunk, torch.Tensor | None]]:
        """Each chunk with its logits row (None: it does not sample). A failed forward is
        retried in halves until the chunk that fails is alone; that sequence fails, the
        others' tokens are recomputed (their K/V slots rewritten with the same values)."""
        try:
            logits = self.runner.run(chunks)
        except Exception as exc:
            if len(chunks) == 1:
                log.exception("request %s failed in the model step", chunks[0].seq.request_id)
                self._fail(chunks[0].seq, exc)
                return []
            log.warning("a model step of %d sequences failed (%r); retrying it in halves",
                        len(chunks), exc)
            half = len(chunks) // 2
            return self._forward(chunks[:half]) + self._forward(chunks[half:])
        rows = iter(logits)
        return [(c, next(rows) if c.samples else None) for c in chunks]

    def _postprocess(self, chunk: Chunk, logits: torch.Tensor | None
                     ) -> list[tuple[Sequence, torch.Tensor, Sequence | None]]:
        """Commits the chunk's blocks; returns who samples from its logits row: the
        sequence, after the choices forked from it (each with the parent it forks from)."""
        seq = chunk.seq
        seq.num_computed += chunk.length
        self.scheduler.commit(seq)
        if logits is None:
            return []
        takers: list[tuple[Sequence, torch.Tensor, Sequence | None]] = []
        if seq.params.n > 1 and seq.index == 0 and not seq.forked:
            takers = [(child, logits, seq) for child in self._fork(seq)]
        return [*takers, (seq, logits, None)]

    def _take_all(self, takers: list[tuple[Sequence, torch.Tensor, Sequence | None]],
                  now: float) -> None:
        """Samples every taker's next token in one batched pass over the step's logits,
        then appends and sends each. A failure there is the sequence's own."""
        logits = _matrix([row for _, row, _ in takers])
        rows = [SampleRow(seq.params, seq.history() if seq.params.penalised else (),
                          seq.num_prompt_tokens) for seq, _, _ in takers]
        for row, u in zip(rows, sampler.uniforms([s.seed for s, _, _ in takers],
                                                 [s.num_output for s, _, _ in takers]),
                          strict=True):
            row.uniform = float(u)
        try:
            tokens, logprobs = self._sample(logits, rows, [s for s, _, _ in takers])
        except Exception:  # find whose parameters break it: sample the rows one by one
            log.exception("batched sampling failed; sampling the step's rows one by one")
            tokens, logprobs = [], []
            for i, (seq, _, _) in enumerate(takers):
                try:
                    one, one_lp = self._sample(logits[i : i + 1], rows[i : i + 1], [seq])
                except Exception as exc:
                    self._fail(seq, exc)
                    one, one_lp = [-1], [None]
                tokens += one
                logprobs += one_lp
        for (seq, _, parent), token, logprob in zip(takers, tokens, logprobs, strict=True):
            if token < 0 or seq.is_finished:
                continue
            try:
                self._take(seq, token, logprob, now)
                if parent is not None and not seq.is_finished:
                    self.scheduler.fork(parent, seq)
            except Exception as exc:
                log.exception("request %s failed after the model step", seq.request_id)
                self._fail(seq, exc)

    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[SampleRow], seqs: list[Sequence]
                ) -> tuple[list[int], list[TokenLogprob | None]]:
        ids = sampler.sample(logits, rows)
        which = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        found = sampler.logprobs(logits, which, ids,
                                 [int(seqs[i].params.logprobs or 0) for i in which])
        out: list[TokenLogprob | None] = [None] * len(seqs)
        for i, lp in zip(which, found, strict=True):
            out[i] = lp
        return ids.tolist(), out

    def _take(self, seq: Sequence, token: int, logprob: TokenLogprob | None, now: float) -> None:
        """Append the sampled token, send it, finish if it ends the sequence."""
        prompt_usage = None
        if seq.first_token_at is None:
            seq.first_token_at = now
            if seq.index == 0:  # the prompt is billed with choice 0 only
                prompt_usage = seq.usage()
        complete = self.grammars.accept(seq, token)  # its grammar allows nothing more
        text, reason = append_token(seq, token, self.tokenizer.eos_token_ids, self.max_model_len,
                                    complete=complete)
        event = TokenEvent(text, [token], prompt_usage,
                           None if prompt_usage is None else seq.cache_detail(), seq.index,
                           None if logprob is None else [logprob], final=reason is not None)
        if seq.request.stream:
            seq.flow.emitted += 1
            seq.emit(event)
        else:
            seq.held.append(event)
        if reason is not None:
            self._finish(seq, reason)

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """Choices 1..n-1 of ``parent``'s request, started once its prompt is computed:
        each samples its first token from the same logits row (with its own seed) and
        runs on the parent's prompt pages (``Scheduler.fork``): one prefill for all."""
        parent.forked = True
        children = []
        for index in range(1, parent.params.n):
            child = Sequence(parent.request, self.tokenizer, arrival=parent.arrival, index=index)
            child.emit = parent.emit
            child.flow = parent.flow
            self._seqs[child.seq_id] = child
            children.append(child)
        return children

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self._report_finish(seq)

    def _report_finish(self, seq: Sequence) -> None:
        self._seqs.pop(seq.seq_id, None)
        seq.finish_reason = seq.finish_reason or "stop"
        self._release_held(seq)
        ttft = None if seq.first_token_at is None else seq.first_token_at - seq.arrival
        engine_s = time.monotonic() - seq.arrival
        seq.emit(FinishEvent(seq.usage(), seq.finish_reason, ttft_s=ttft, engine_s=engine_s,
                             stop_sequence=seq.stop_sequence, index=seq.index,
                             cache=seq.cache_detail()))
        if seq.index == 0 and not seq.forked:  # ended before its prompt was computed
            for index in range(1, seq.params.n):
                seq.emit(FinishEvent(Usage(seq.num_prompt_tokens), seq.finish_reason,
                                     engine_s=engine_s, index=index))

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        self.scheduler.finish(seq, "error")
        self._seqs.pop(seq.seq_id, None)
        self._release_held(seq)
        # An error the client is told about before any work (the prompt never fit) is
        # raised as it is; any other failure carries the usage so far, for the bill: a
        # grammar given up on midway included (the client's spec, but tokens were made).
        before_work = isinstance(exc, EngineError) and not isinstance(exc, InvalidGrammar)
        seq.emit(ErrorEvent(exc, None if before_work else seq.usage()))

    @staticmethod
    def _release_held(seq: Sequence) -> None:
        """The held tokens of a request that does not stream, as one event."""
        if seq.held:
            held, seq.held = seq.held, []
            # the first token is held too, and it carries the prompt usage
            logprobs = None
            if seq.params.logprobs is not None:
                logprobs = [lp for e in held for lp in e.logprobs or []]
            seq.emit(TokenEvent("".join(e.text for e in held),
                                [t for e in held for t in e.token_ids], held[0].prompt_usage,
                                held[0].prompt_cache, seq.index, logprobs, held[-1].final))

    def _shutdown(self) -> None:
        """Every stream still open ends with a ``cancelled`` finish, none hangs."""
        for seq in list(self._seqs.values()):
            self._finish(seq, "cancelled")
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, Add):
                cmd.seq.finish_reason = "cancelled"
                self._report_finish(cmd.seq)
            elif (isinstance(cmd, Call) and cmd.future is not None
                  and cmd.future.set_running_or_notify_cancel()):
                cmd.future.set_exception(RuntimeError("the engine has stopped"))


def _nothing() -> None:
    pass


def _deliver(items: list[tuple[asyncio.Queue[EngineEvent], EngineEvent]]) -> None:
    for events, ev in items:
        events.put_nowait(ev)


def _matrix(rows: list[torch.Tensor]) -> torch.Tensor:
    """The rows as one ``[n, vocab]`` tensor: a view when they are consecutive rows of one
    logits tensor (the usual step), a copy otherwise (forked choices, a split forward)."""
    base = rows[0]._base
    if base is not None and base.dim() == 2 and all(r._base is base for r in rows):
        stride = base.stride(0)
        first = (rows[0].storage_offset() - base.storage_offset()) // stride
        index = [(r.storage_offset() - base.storage_offset()) // stride for r in rows]
        if index == list(range(first, first + len(rows))):
            return base[first : first + len(rows)]
        return base.index_select(0, torch.tensor(index, device=base.device))
    return torch.stack(rows)
