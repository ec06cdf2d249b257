"""One generation from admission to the ledger row: the part both APIs share.

Billing happens exactly once, from the engine's final ``Usage``: ``stream`` records the
usage event as soon as the engine finishes, before the handler writes its last bytes; if
the client goes away (or the handler is cancelled) ``__aexit__`` cancels the engine
request and bills the tokens produced so far with status ``cancelled``. A stream whose
client stops reading is such a client once ``--write-timeout`` passes (``transport``).

Admission's token debit (``limits``) is taken in ``__aenter__`` from the prompt and the
request's most output, and settled with the billed completion tokens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from types import TracebackType

from aiohttp import web

from kvgate.gateway.edge.context import ctx_of, principal_of
from kvgate.gateway.edge.errors import ClientGone
from kvgate.gateway.engine import (
    EngineOverloaded,
    EngineUnavailable,
    FinishEvent,
    GenerateRequest,
    InvalidGrammar,
    InvalidTokens,
    PromptTooLong,
    SamplingParams,
    SequenceFailed,
    TokenEvent,
)
from kvgate.gateway.http.admission import charge
from kvgate.gateway.http.budgets import reserve as reserve_budget
from kvgate.gateway.http.choices import Choices, merged
from kvgate.gateway.http.limits import Ticket
from kvgate.gateway.http.state import AppState, state_of
from kvgate.gateway.ledger import UsageEvent
from kvgate.gateway.ledger.budgets import NO_HOLD
from kvgate.gateway.ledger.receipts import new_receipt_id
from kvgate.gateway.protocol.cache_request import NO_CACHE_REQUEST, CacheRequest, check_retention
from kvgate.gateway.protocol.errors import ApiError, prompt_param, structured_param
from kvgate.gateway.protocol.priority import check_priority, engine_terms
from kvgate.gateway.usage import CacheDetail, Usage

log = logging.getLogger("kvgate.http")

_CANCEL_DRAIN_S = 5.0
_CLIENT_POLL_S = 0.05  # how often a generation looks whether its client is still there


def engine_unavailable(exc: EngineUnavailable) -> ApiError:
    """The engine core process is down (restarting): the API's 503, to retry shortly."""
    return ApiError(503, f"The engine is unavailable: {exc}.", code="engine_unavailable",
                    retry_after=2.0)


class Generation:
    def __init__(self, request: web.Request, endpoint: str, model: str,
                 prompt_ids: list[int], sampling: SamplingParams,
                 ttl_segments: list[tuple[int, float]] | None = None,
                 more_prompts: list[list[int]] | None = None,
                 cache: CacheRequest = NO_CACHE_REQUEST, priority: int = 0,
                 max_tokens_param: str | None = "max_tokens") -> None:
        """``priority``: the request's (``scheduling.priority_of``); ``max_tokens_param``:
        the field that set ``sampling.max_tokens``, None when the request named none (the
        default bound may then be lowered to what the tenant's token rate has left)."""
        self.request = request
        self.state: AppState = state_of(request)
        self.principal = principal_of(request)
        self.endpoint = endpoint
        self.model = model
        self.prompt_ids = prompt_ids
        # A completions request's further prompts: each its own engine request, one bill
        self.more_prompts = more_prompts or []
        self.choices = Choices(sampling.n, 1 + len(self.more_prompts))
        self.sampling = sampling
        self.ttl_segments = ttl_segments or []
        self.cache_request = cache
        self.priority = priority
        self.max_tokens_param = max_tokens_param
        self.request_id: str = ctx_of(request).request_id
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None  # the stop string that ended the output
        self.client_gone = False  # the client hung up; the engine was told to stop
        self.usage: Usage | None = None  # what was billed
        self.prompt_usage: Usage | None = None  # prompt side, known at the first token
        self.prompt_cache = CacheDetail()  # the blocks behind prompt_usage
        # each prompt's split and blocks, from its first choice's first token
        self._prompt_seen: dict[int, tuple[Usage, CacheDetail]] = {}
        # The receipt the ledger signs for this request; named in the response's headers
        self.receipt_id = ctx_of(request).receipt_id = new_receipt_id()
        self.completion_tokens = 0
        self.text_parts: list[str] = []
        self.output_ids: list[int] = []  # the tokens sampled, EOS included (stored responses)
        self._watcher: asyncio.Task[None] | None = None
        self._ticket: Ticket | None = None
        self._budget = NO_HOLD  # this request's worst case, held against spend budgets
        self._agen: AsyncGenerator[TokenEvent | FinishEvent, None] | None = None
        self._t0 = time.monotonic()
        self._started_at = datetime.now(UTC)
        self._ttft_s: float | None = None
        self._engine_s: float | None = None
        self._billed = False
        self._failed = False
        self._failed_usage: Usage | None = None  # the engine's own account of a failure
        self._streaming = True  # False: run() wants the whole text, not token by token
        self._finish_0 = "stop"  # choice 0's finish reason (the request's, when n is 1)

    async def __aenter__(self) -> Generation:
        check_retention(self.cache_request, self.ttl_segments, self.principal.cache_max_ttl_seconds)
        check_priority(self.principal, self.priority)
        self._ticket, self.sampling.max_tokens = charge(
            self.request, len(self.prompt_ids) + sum(map(len, self.more_prompts)),
            self.sampling.max_tokens, self.sampling.n * (1 + len(self.more_prompts)),
            self.max_tokens_param)
        try:  # its worst case as admitted (charge may have lowered max_tokens)
            self._budget = await reserve_budget(self)
        except BaseException:
            self._ticket.release()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._watcher is not None:  # a stream the handler left unfinished
            self._watcher.cancel()
        try:
            if not self._billed and self._agen is not None:
                await asyncio.shield(self._bill_cancelled())
        finally:
            self._budget.release()  # settled already when billed
            if self._ticket is not None:
                self._ticket.release()

    def _engine_request(self) -> GenerateRequest:
        p = self.principal
        ttl = (self.cache_request.ttl_s or p.cache_ttl_seconds
               or self.state.settings.cache.default_cache_ttl_seconds)
        return GenerateRequest(
            request_id=self.request_id, namespace=self.state.quotas.apply(p),
            prompt_token_ids=self.prompt_ids, sampling=self.sampling,
            ttl_segments=self.ttl_segments, default_ttl_s=float(ttl), stream=self._streaming,
            priority=self.priority, **engine_terms(p))

    def _engine_ids(self) -> list[str]:
        return [self.request_id] + [f"{self.request_id}-{k}"
                                    for k in range(1, 1 + len(self.more_prompts))]

    def _open(self) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
        engine = self.state.engine
        first = self._engine_request()
        if self._ticket is not None:  # the engine's occupancy counts it from now on
            self._ticket.submitted()
        if not self.more_prompts:
            return engine.generate(first)
        requests = [first] + [replace(first, request_id=rid, prompt_token_ids=ids) for rid, ids
                              in zip(self._engine_ids()[1:], self.more_prompts, strict=True)]
        for r in requests:  # every prompt checked before any runs
            engine.check(r)
        return merged([engine.generate(r) for r in requests], self.sampling.n)

    def _cancel_engine(self) -> None:
        for rid in self._engine_ids():
            self.state.engine.cancel(rid)

    async def stream(self) -> AsyncIterator[str]:
        """Text pieces of choice 0 as the engine makes them; billed before the iterator ends."""
        async for ev in self.events():
            if ev.text and ev.index == 0:
                yield ev.text

    async def events(self) -> AsyncIterator[TokenEvent]:
        """The engine's token events of every choice (``ev.index``), as it makes them;
        billed, once for all choices, before the iterator ends."""
        self._watcher = watcher = asyncio.create_task(self._watch_client())
        try:
            self._agen = self._open()
            async for ev in self._agen:
                if isinstance(ev, FinishEvent):
                    self._engine_s = max(self._engine_s or 0.0, ev.engine_s)
                    if ev.index == 0:
                        self.stop_sequence = ev.stop_sequence
                        self._finish_0 = ev.finish_reason
                    if self.choices.finish(ev):
                        await self._bill(self.choices.usage(), self._finish_0, "ok",
                                         self.choices.cache())
                        return
                    continue
                if self._ttft_s is None:
                    self._ttft_s = time.monotonic() - self._t0
                if ev.prompt_usage is not None and ev.index % self.sampling.n == 0:
                    self._prompt_seen.setdefault(ev.index // self.sampling.n,
                                                 (ev.prompt_usage,
                                                  ev.prompt_cache or CacheDetail()))
                if ev.prompt_usage is not None and ev.index == 0:
                    self.prompt_usage = ev.prompt_usage
                    self.prompt_cache = ev.prompt_cache or CacheDetail()
                    if self.state.checkpoints is not None:  # journalled against a crash
                        self.state.checkpoints.track(self.request_id, self._checkpoint)
                self.completion_tokens += len(ev.token_ids)
                if self.state.checkpoints is not None:
                    self.state.checkpoints.advanced(self.request_id, self.completion_tokens)
                self.choices.add(ev)
                if ev.index == 0:
                    self.output_ids += ev.token_ids
                    if ev.text:
                        self.text_parts.append(ev.text)
                yield ev
                transport = self.request.transport
                if transport is None or transport.is_closing():
                    self._gone()
                    raise ClientGone()
        except PromptTooLong as exc:
            self._agen = None
            raise ApiError(400, f"The prompt is too long for this model's context: {exc}",
                           code="context_length_exceeded",
                           param=prompt_param(self.request.path)) from exc
        except InvalidGrammar as exc:
            self._agen = None
            raise ApiError(400, f"The structured output spec is not valid: {exc}",
                           code="invalid_value",
                           param=structured_param(self.request.path)) from exc
        except InvalidTokens as exc:
            self._agen = None
            raise ApiError(400, f"The prompt holds a token id this model does not have: {exc}",
                           code="invalid_value", param="prompt") from exc
        except EngineUnavailable as exc:  # before any work: its core process restarts
            self._agen = None
            raise engine_unavailable(exc) from exc
        except EngineOverloaded as exc:
            self._agen = None
            raise ApiError(503, "The engine is at capacity; retry shortly.", code="overloaded",
                           retry_after=1.0) from exc
        except (ClientGone, asyncio.CancelledError):
            raise
        except SequenceFailed as exc:
            self._failed = True  # billed as "error" by __aexit__, with the engine's usage
            self._failed_usage = self._usage_of_failure(exc.usage)
            if isinstance(exc.__cause__, InvalidGrammar):  # the client's grammar gave out
                raise ApiError(400, f"The structured output spec could not be followed: "
                               f"{exc.__cause__}", code="invalid_value") from exc
            if isinstance(exc.__cause__, EngineUnavailable):  # its core process died
                raise engine_unavailable(exc.__cause__) from exc
            raise
        except Exception:
            self._failed = True  # billed as "error" with what was done, by __aexit__
            raise
        finally:
            watcher.cancel()
        if not self._billed:
            raise RuntimeError("engine stream ended without a FinishEvent")

    def _usage_of_failure(self, failed: Usage) -> Usage:
        """What a failed request is billed: the engine's account of the request that failed
        (``failed``), or, when several prompts ran, every prompt whose split was seen and
        the tokens of every choice that reached this server (the failure ends the others,
        and one engine request's account would leave them unbilled)."""
        if not self.more_prompts:
            return failed
        seen = [self._prompt_seen[k][0] for k in sorted(self._prompt_seen)]
        if not seen:
            return failed
        writes: dict[int, int] = {}
        for u in seen:
            for ttl, tokens in u.cache_writes.items():
                writes[ttl] = writes.get(ttl, 0) + tokens
        return Usage(sum(u.prompt_tokens for u in seen), sum(u.cached_tokens for u in seen),
                     writes, max(self.completion_tokens, failed.completion_tokens))

    async def run(self) -> str:
        """The whole answer, which the engine sends as one event at the end. A client that
        leaves meanwhile stops the engine (``_watch_client``): what it generated until then
        is billed as cancelled, and no answer is written."""
        self._streaming = False
        async for _ in self.stream():
            pass
        if self.client_gone:
            raise ClientGone()
        return "".join(self.text_parts)

    async def _watch_client(self) -> None:
        """Stops the engine request as soon as the client's connection closes. The server
        does not cancel handlers when a client hangs up, and a request that is not
        streamed hears nothing from the engine until the end, so nothing else would notice
        before all ``max_tokens`` were made. The engine then finishes the request as
        ``cancelled`` with its own usage (the prompt's cache split included)."""
        while True:
            await asyncio.sleep(_CLIENT_POLL_S)
            transport = self.request.transport
            if transport is None or transport.is_closing():
                self._gone()
                self._cancel_engine()
                return

    def _gone(self) -> None:
        self.client_gone = True
        ctx = ctx_of(self.request)
        if ctx.gone is None:
            ctx.gone = "hangup"

    def elapsed_s(self) -> float:
        return time.monotonic() - self._t0

    async def _bill_cancelled(self) -> None:
        """Client gone, handler cancelled or engine failed: stop the engine, bill what it did
        (the engine's own final usage when it reports one after the cancel)."""
        usage = None
        cache = self.prompt_cache
        if self._failed and self.more_prompts and self._prompt_seen:
            cache = CacheDetail()  # every prompt's, as _usage_of_failure bills them
            for k in sorted(self._prompt_seen):
                cache += self._prompt_seen[k][1]
        if not self._failed:
            self._cancel_engine()
            try:
                usage = await asyncio.wait_for(self._drain(), _CANCEL_DRAIN_S)
                if usage is not None:
                    cache = self.choices.cache()
            except TimeoutError:
                log.warning("request %s: engine did not finish after cancel", self.request_id)
            except SequenceFailed as exc:  # it failed while stopping: its own account
                usage = exc.usage
            except Exception:  # it failed while stopping: bill from what it reported
                log.exception("request %s: engine failed after cancel", self.request_id)
        if self._agen is not None:
            await self._agen.aclose()
        if usage is None:
            usage = self._failed_usage
        if usage is None:  # the prompt's split as the engine reported it at the first token
            known = self.prompt_usage or Usage(len(self.prompt_ids))
            usage = replace(known, completion_tokens=self.completion_tokens)
        status = "error" if self._failed else "cancelled"
        await self._bill(usage, status, status, cache)

    def _checkpoint(self) -> UsageEvent | None:
        """The usage delivered so far, as a crash would bill it (``ledger/checkpoints.py``)."""
        if self._billed or self.prompt_usage is None:
            return None
        usage = replace(self.prompt_usage, completion_tokens=self.completion_tokens)
        return self._event(usage, "interrupted", self.prompt_cache)

    def _event(self, usage: Usage, status: str, cache: CacheDetail) -> UsageEvent:
        p = self.principal
        assert p.tenant_id is not None  # the auth middleware lets only tenant keys through
        return UsageEvent(
            request_id=self.request_id, tenant_id=p.tenant_id, key_id=p.key_id,
            model=self.model, endpoint=self.endpoint, usage=usage, status=status,
            started_at=self._started_at, finished_at=datetime.now(UTC),
            ttft_ms=None if self._ttft_s is None else round(self._ttft_s * 1000.0),
            receipt_id=self.receipt_id, cache=cache, cache_key=self.cache_request.key)

    async def _drain(self) -> Usage | None:
        assert self._agen is not None
        async for ev in self._agen:
            if isinstance(ev, FinishEvent):
                self._engine_s = ev.engine_s
                if self.choices.finish(ev):
                    return self.choices.usage()
                continue
            self.completion_tokens += len(ev.token_ids)
        return None

    async def _bill(self, usage: Usage, finish_reason: str, status: str,
                    cache: CacheDetail) -> None:
        if finish_reason == "cancelled" and status == "ok":
            status = "cancelled"
        self.usage = usage
        self.finish_reason = finish_reason
        ctx = ctx_of(self.request)
        ctx.engine_s = self._engine_s if self._engine_s is not None else self.elapsed_s()
        p = self.principal
        event = self._event(usage, status, cache)
        self._billed = True
        ctx.completion_tokens = usage.completion_tokens
        if self._ticket is not None:  # the unused part of the output debit goes back
            self._ticket.settle(usage.completion_tokens)
        t0 = time.monotonic()
        checkpoints = self.state.checkpoints
        try:
            billed = await self.state.ledger.record(event)
        except BaseException:
            if checkpoints is not None:  # billed from its checkpoint at the next start
                checkpoints.finish(self.request_id, billed=False)
            raise
        if checkpoints is not None:  # held in memory only: the journal keeps it durable
            checkpoints.finish(self.request_id, billed=not billed.held,
                               final=event if billed.held else None)
        self._budget.settle(billed)
        ctx.ledger_s = time.monotonic() - t0
        if billed.new:
            m = self.state.metrics
            m.observe_usage(
                m.tenant(p.tenant_id), self.endpoint, usage, billed.cost_micros, self.cache_outcome(),
                self._ttft_s, self.elapsed_s())

    def cache_outcome(self) -> str:
        u = self.usage
        if u is None or u.cached_tokens == 0:
            return "miss"
        if u.cached_tokens + self.state.settings.cache.block_size >= u.prompt_tokens:
            return "hit"
        return "partial"
