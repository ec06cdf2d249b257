"""Admission control: per-tenant rate limits (sliding one-minute window) and a global bound.

In memory, per process: with several replicas each enforces its share. Limits come from the
tenant's ledger record (``Principal``); ``None`` means unlimited.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.http.errors import ApiError

WINDOW_S = 60.0


@dataclass
class _Window:
    """(time, amount) entries of the last minute; sum kept alongside for O(1) checks."""

    entries: deque[tuple[float, int]] = field(default_factory=deque)
    total: int = 0

    def trim(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - WINDOW_S:
            _, amount = self.entries.popleft()
            self.total -= amount

    def retry_after(self, now: float, need: int, limit: int) -> float:
        """Seconds until enough old entries leave the window to fit ``need`` more."""
        excess = self.total + need - limit
        for t, amount in self.entries:
            excess -= amount
            if excess <= 0:
                return max(1.0, t + WINDOW_S - now)
        return WINDOW_S

    def add(self, now: float, amount: int) -> None:
        if amount:
            self.entries.append((now, amount))
            self.total += amount


@dataclass
class _TenantState:
    requests: _Window = field(default_factory=_Window)
    tokens: _Window = field(default_factory=_Window)
    running: int = 0


class Ticket:
    """Holds one admitted request's concurrency slot; ``release`` is idempotent."""

    def __init__(self, limiter: Limiter, tenant_id: object) -> None:
        self._limiter = limiter
        self._tenant_id = tenant_id
        self._held = True

    def add_tokens(self, n: int) -> None:
        self._limiter._state(self._tenant_id).tokens.add(self._limiter.clock(), n)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limiter._state(self._tenant_id).running -= 1
            self._limiter.inflight -= 1


class Limiter:
    def __init__(self, max_inflight: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_inflight = max_inflight
        self.inflight = 0
        self.clock = clock
        self._tenants: dict[object, _TenantState] = {}

    def _state(self, tenant_id: object) -> _TenantState:
        return self._tenants.setdefault(tenant_id, _TenantState())

    def admit(self, principal: object, prompt_tokens: int) -> Ticket:
        """Admit or raise 429 (tenant over its limits) / 503 (gateway full), with Retry-After."""
        now = self.clock()
        tid = principal.tenant_id  # type: ignore[attr-defined]
        st = self._state(tid)
        st.requests.trim(now)
        st.tokens.trim(now)
        rpm = principal.requests_per_minute  # type: ignore[attr-defined]
        tpm = principal.tokens_per_minute  # type: ignore[attr-defined]
        conc = principal.max_concurrent  # type: ignore[attr-defined]
        if rpm is not None and st.requests.total + 1 > rpm:
            raise ApiError(429, f"Rate limit reached: {rpm} requests per minute for this tenant.",
                           code="rate_limit_exceeded",
                           retry_after=st.requests.retry_after(now, 1, rpm))
        if tpm is not None and st.tokens.total + prompt_tokens > tpm:
            if prompt_tokens > tpm:
                raise ApiError(429, f"This prompt ({prompt_tokens} tokens) exceeds the tenant's "
                               f"limit of {tpm} tokens per minute.", code="rate_limit_exceeded",
                               retry_after=WINDOW_S)
            raise ApiError(429, f"Rate limit reached: {tpm} tokens per minute for this tenant.",
                           code="rate_limit_exceeded",
                           retry_after=st.tokens.retry_after(now, prompt_tokens, tpm))
        if conc is not None and st.running >= conc:
            raise ApiError(429, f"Too many concurrent requests: this tenant may run {conc} "
                           "at once.",
                           code="rate_limit_exceeded", retry_after=1.0)
        if self.inflight >= self.max_inflight:
            raise ApiError(503, "The server is at capacity; retry shortly.",
                           code="overloaded", retry_after=1.0)
        st.requests.add(now, 1)
        st.tokens.add(now, prompt_tokens)
        st.running += 1
        self.inflight += 1
        return Ticket(self, tid)
