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

from kvgate.gateway.http.cache_params import CacheRequest
from kvgate.gateway.http.errors import ApiError
from kvgate.gateway.http.state import AppState
from kvgate.gateway.ledger import Principal
from kvgate.gateway.ledger.budgets import NO_HOLD, BudgetExceeded, Hold
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


def worst_cases(gen: Generation) -> list[Usage]:
    """The usages the request could at most be billed (the dearest depends on the plan)."""
    p, settings = gen.principal, gen.state.settings
    prompt = len(gen.prompt_ids) + sum(map(len, gen.more_prompts))
    output = gen.sampling.n * (1 + len(gen.more_prompts)) * gen.sampling.max_tokens
    default_ttl = (gen.cache_request.ttl_s or p.cache_ttl_seconds
                   or settings.default_cache_ttl_seconds)  # as the engine request has it
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
        m = state.metrics
        m.admission_rejected.labels("budget", m.tenant(p.tenant_id)).inc()
        if exc.never:
            raise ApiError(400, str(exc), code="request_exceeds_budget") from None
        raise ApiError(429, str(exc), code="budget_exceeded",
                       retry_after=exc.retry_after_s) from None
