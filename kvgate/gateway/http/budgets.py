"""Spend budgets at admission: the most a generation can cost, reserved before it runs
(``Generation.__aenter__``) and settled with what the ledger billed (``Generation._bill``).
The figures and the rule are ``kvgate.gateway.ledger.budgets``; prices are the plan's,
applied by ``billing.cost_micros`` and nowhere else.

The worst case of a request: every prompt token at the dearest input class it could be
billed in (uncached input, or a cache write at any TTL the request writes with), each
prompt once, plus ``max_tokens`` of output for each of its choices (``n`` per prompt,
every prompt of a multi-prompt completion). Explicit caches (``/v1/caches``) and
Responses go through ``Generation`` too. Reservation and storage charges (``reservations.py``)
are periodic and not gated: they may take spend past a budget.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

from kvgate.gateway.http.state import AppState
from kvgate.gateway.ledger import Principal
from kvgate.gateway.ledger.budgets import NO_HOLD, BudgetExceeded, Hold
from kvgate.gateway.protocol.cache_request import CacheRequest
from kvgate.gateway.protocol.errors import ApiError
from kvgate.gateway.usage import Usage

if TYPE_CHECKING:  # the engine pulls in torch
    from kvgate.gateway.engine import SamplingParams


class Generation(Protocol):
    """What of a ``generation.Generation`` its worst case is made of."""

    state: AppState
    principal: Principal
    prompt_ids: list[int]
    more_prompts: list[list[int]]
    sampling: SamplingParams
    cache_request: CacheRequest
    ttl_segments: list[tuple[int, float]]
    max_tokens_param: str | None  # None: the request named no output bound


def worst_cases(gen: Generation) -> list[Usage]:
    """The usages the request could at most be billed (the dearest depends on the plan)."""
    p, settings = gen.principal, gen.state.settings
    prompt = len(gen.prompt_ids) + sum(map(len, gen.more_prompts))
    output = gen.sampling.n * (1 + len(gen.more_prompts)) * gen.sampling.max_tokens
    default_ttl = (gen.cache_request.ttl_s or p.cache_ttl_seconds
                   or settings.cache.default_cache_ttl_seconds)  # as the engine request has it
    ttls = {max(1, math.ceil(t)) for t in (default_ttl, *(t for _, t in gen.ttl_segments))}
    return [Usage(prompt, completion_tokens=output),
            *(Usage(prompt, cache_writes={ttl: prompt}, completion_tokens=output)
              for ttl in sorted(ttls))]


async def reserve(gen: Generation) -> Hold:
    """The request's reservation (nothing for a key without budgets), or the refusal: 429
    ``budget_exceeded`` with Retry-After until the budget resets, or 400
    ``request_exceeds_budget`` when its worst case alone is more than the budget."""
    p = gen.principal
    if not p.has_budget:
        return NO_HOLD
    state = gen.state
    try:
        return await state.budgets.reserve(p, worst_cases(gen))
    except BudgetExceeded as exc:
        if gen.max_tokens_param is None and (hold := await _fit(gen)) is not None:
            return hold
        m = state.metrics
        m.admission_rejected.labels("budget", m.tenant(p.tenant_id)).inc()
        if exc.never:
            raise ApiError(400, str(exc), code="request_exceeds_budget", retry=False) from None
        raise ApiError(429, str(exc), code="budget_exceeded", retry=False,
                       retry_after=exc.retry_after_s) from None


async def _fit(gen: Generation) -> Hold | None:
    """A request that named no output bound is not refused while some output fits: its
    bound is lowered to the most whose worst case the budgets still hold (as a
    tokens-per-minute limit cuts it), and it ends with ``length`` there. None: not even
    one token fits."""
    budgets, p, sampling = gen.state.budgets, gen.principal, gen.sampling
    lo, hi, best = 1, sampling.max_tokens - 1, None
    wanted = sampling.max_tokens
    try:
        while lo <= hi:  # the largest bound that fits, each try held and let go
            sampling.max_tokens = mid = (lo + hi) // 2
            try:
                hold = await budgets.reserve(p, worst_cases(gen))
            except BudgetExceeded:
                hi = mid - 1
                continue
            hold.release()
            best, lo = mid, mid + 1
        if best is None:
            return None
        sampling.max_tokens = best
        return await budgets.reserve(p, worst_cases(gen))
    except BudgetExceeded:  # spent meanwhile by another request
        return None
    finally:
        if best is None:
            sampling.max_tokens = wanted
